//! Python clients the tests drive (the official `openai` and `ollama`
//! packages, a DevTools client), installed once into shoal's cache.

/// A Python package installed once into the cache (`pip install --target`);
/// the directory to put on `PYTHONPATH`.
pub fn python_package(dir_name: &str, module: &str, requirement: &str) -> std::path::PathBuf {
    let cache = std::env::var_os("SHOAL_CACHE_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/shoal")
        });
    let dir = cache.join("py").join(dir_name);
    if !dir.join(module).exists() {
        let tmp = cache.join(format!("py/{dir_name}.tmp{}", std::process::id()));
        let ok = std::process::Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--target",
            ])
            .arg(&tmp)
            .arg(requirement)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "pip install {requirement} failed");
        let _ = std::fs::rename(&tmp, &dir);
        let _ = std::fs::remove_dir_all(&tmp);
    }
    dir
}

/// The official `openai` Python package.
pub fn openai_python() -> std::path::PathBuf {
    python_package("openai-1", "openai", "openai>=1.40,<2")
}
