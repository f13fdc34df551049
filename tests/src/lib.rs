//! Harness for shoal's end-to-end tests: real `shoal` processes on
//! loopback or in Linux network namespaces, helpers to talk to them, and
//! random-weight models.
//!
//! Everything started here is stopped on drop (processes killed,
//! namespaces deleted), also when a test fails.
//!
//! # Rules the harness enforces
//! - **No fixed sleeps to wait**: tests wait for events (a log line, a
//!   status that matches, the first token) under a deadline.
//! - **Deadlines scale** with one factor, `SHOAL_TEST_TIME_FACTOR`
//!   (default 1; raise it on a slow or loaded machine): [`scaled`].
//! - **Multi-node tests run one at a time** ([`serial`]): on a 2-core
//!   machine, two clusters at once starve each other's timers.
//! - **Status is read over HTTP** (`GET /api/status`, inside the node's
//!   namespace when it has one), not by spawning `shoal status`.
//! - **Nothing skips quietly**: a missing prerequisite (namespaces, a
//!   browser, a Python package) is reported loudly, and fails the test when
//!   `SHOAL_TEST_STRICT=1` (set by `.ci/run`): [`prerequisite`].
//!
//! # Layout
//! - [`proc`]: [`NodeProc`], a `shoal node` process.
//! - [`cluster`]: clusters on loopback and in namespaces, and the checks
//!   against one machine.
//! - [`lan`]: [`Lan`], namespaces on a bridge.
//! - [`relay`]: [`UdpRelay`], a slow link on loopback.
//! - [`browser`]: headless Chromium for the page tests.
//! - [`python`]: Python client packages, installed once into the cache.
//! - [`synth`]: random-weight GGUFs of any shape.

pub mod browser;
pub mod cluster;
pub mod lan;
pub mod proc;
pub mod python;
pub mod relay;
pub mod synth;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

pub use browser::{chromium, headless};
pub use lan::Lan;
pub use proc::{LogsOnFailure, NodeProc};
pub use relay::UdpRelay;

/// The `shoal` binary next to the test executable (built by `cargo test --workspace`).
pub fn shoal_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join("shoal");
    assert!(
        bin.exists(),
        "{} missing: run `cargo build -p shoal` (cargo test --workspace builds it)",
        bin.display()
    );
    bin
}

/// The default model, fetched and cached (a failure to fetch fails the test).
pub fn default_model() -> PathBuf {
    models::default_model().expect("default model")
}

/// Whether missing prerequisites fail instead of skipping
/// (`SHOAL_TEST_STRICT=1`, set by `.ci/run`).
pub fn strict() -> bool {
    std::env::var("SHOAL_TEST_STRICT").is_ok_and(|v| v == "1")
}

/// Checks a prerequisite: `true` when `available`. Otherwise it says so
/// loudly on stderr and returns `false` (the test returns early), or,
/// under [`strict`], fails the test: a green CI run means everything ran.
pub fn prerequisite(what: &str, available: bool) -> bool {
    if available {
        return true;
    }
    assert!(
        !strict(),
        "missing prerequisite: {what} (SHOAL_TEST_STRICT=1 makes this a failure)"
    );
    eprintln!("\n*** SKIPPED: missing prerequisite: {what} ***\n");
    false
}

/// `d` times `SHOAL_TEST_TIME_FACTOR` (default 1, at least 1): every
/// deadline in the tests goes through here.
pub fn scaled(d: Duration) -> Duration {
    let factor = std::env::var("SHOAL_TEST_TIME_FACTOR")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|f| f.is_finite() && *f >= 1.0)
        .unwrap_or(1.0);
    d.mul_f64(factor)
}

/// Seconds, scaled ([`scaled`]).
pub fn secs(s: u64) -> Duration {
    scaled(Duration::from_secs(s))
}

/// Held by each multi-node test for its whole run: such tests run one at
/// a time in a test binary (a panic in one does not block the others).
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Number of nodes in a status, and how many hold layers.
pub fn plan_size(s: &serde_json::Value) -> (usize, usize) {
    let nodes = s["nodes"].as_array().map_or(0, Vec::len);
    let staged = s["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| !n["layers"].is_null())
        .count();
    (nodes, staged)
}

/// `shoal run` on one machine; stdout.
pub fn run_single(model: &Path, args: &[&str], prompt: &str) -> String {
    let out = Command::new(shoal_bin())
        .arg("run")
        .arg("-m")
        .arg(model)
        .args(["-t", "1"])
        .args(args)
        .arg(prompt)
        .output()
        .expect("shoal run");
    assert!(
        out.status.success(),
        "shoal run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Reads a stream's lines into a string (for child output in tests).
pub fn read_all(r: impl std::io::Read) -> String {
    BufReader::new(r)
        .lines()
        .map_while(Result::ok)
        .collect::<Vec<_>>()
        .join("\n")
}
