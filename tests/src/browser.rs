//! Headless Chromium for the status page tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Debian's Chromium, installed with apt on first use (the test machines
/// are root); `None` where it cannot be had.
pub fn chromium() -> Option<PathBuf> {
    let bin = PathBuf::from("/usr/bin/chromium");
    if bin.exists() {
        return Some(bin);
    }
    let install = |update: bool| {
        let mut c = Command::new("sh");
        let cmd = if update {
            "apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium"
        } else {
            "DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium"
        };
        c.arg("-c")
            .arg(cmd)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        c.status().is_ok_and(|s| s.success())
    };
    if !install(false) && !install(true) {
        return None;
    }
    bin.exists().then_some(bin)
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
