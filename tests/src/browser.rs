//! Headless Chromium for the status page tests, and the other system
//! tools tests use (installed with apt where missing).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Debian's Chromium, installed with apt on first use (the test machines
/// are root); `None` where it cannot be had.
pub fn chromium() -> Option<PathBuf> {
    let bin = PathBuf::from("/usr/bin/chromium");
    if bin.exists() || apt_install("chromium") {
        return bin.exists().then_some(bin);
    }
    None
}

/// Installs a Debian package (the test machines are root and reach
/// Debian's mirror): from the cached package lists first, then after an
/// update. Whether it worked.
pub fn apt_install(package: &str) -> bool {
    let install = |update: bool| {
        let get = format!("DEBIAN_FRONTEND=noninteractive apt-get install -y -q {package}");
        let cmd = if update {
            format!("apt-get update -q && {get}")
        } else {
            get
        };
        Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    install(false) || install(true)
}

/// Whether `program --version` runs, installing Debian's `package` first
/// when it does not.
pub fn tool(program: &str, package: &str) -> bool {
    let runs = || {
        Command::new(program)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    runs() || (apt_install(package) && runs())
}

/// Runs headless Chromium on `url` with `args` (e.g. `--screenshot=F`,
/// `--dump-dom`); its stdout.
pub fn headless(chromium: &Path, url: &str, args: &[&str]) -> String {
    let out = Command::new(chromium)
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1366,900",
            "--timeout=4000",
        ])
        .args(args)
        .arg(url)
        .output()
        .expect("run chromium");
    String::from_utf8_lossy(&out.stdout).into_owned()
}
