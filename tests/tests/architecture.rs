//! The architecture's invariants that a compiler cannot see, checked on
//! the workspace itself: which crate may depend on what, and how big a
//! source file may grow. ARCHITECTURE.md's "Architecture Invariant" lines
//! point here.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Crates that must never appear in a package's dependency tree (normal
/// and build dependencies, all the way down), and why.
const FORBIDDEN: &[(&str, &[&str], &str)] = &[
    (
        "shoal-engine",
        &["tokio", "libp2p", "quinn", "axum", "hyper", "rustls"],
        "the engine knows nothing of networks",
    ),
    (
        "shoal-schedule",
        &["candle-core", "tokio", "libp2p", "quinn", "axum", "hyper"],
        "scheduling decisions are pure",
    ),
    (
        "simulations",
        &[
            "candle-core",
            "candle-nn",
            "tokio",
            "libp2p",
            "quinn",
            "axum",
            "hyper",
        ],
        "the simulator builds without the engine or the network",
    ),
    (
        "protocol",
        &["candle-core", "tokio", "libp2p", "quinn", "axum", "hyper"],
        "the protocol does no I/O",
    ),
    (
        "sharding",
        &["candle-core", "tokio", "libp2p", "quinn", "axum", "hyper"],
        "planning is pure",
    ),
    (
        "shoal-cluster",
        &["axum", "hyper", "hyper-util"],
        "the cluster knows nothing of HTTP",
    ),
];

/// Direct dependencies a package must not have: the API reaches the
/// cluster only through `cluster::Handle`, never its transports.
const FORBIDDEN_DIRECT: &[(&str, &[&str], &str)] = &[(
    "shoal-api",
    &["libp2p", "quinn", "rustls", "candle-core", "shoal-models"],
    "the API talks to the cluster through its Handle only",
)];

/// Longest a source file may be, lines: a file that fits in a head.
const FILE_LINES_MAX: usize = 600;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Package names in `package`'s tree (`depth`: `None` for all the way).
fn tree(package: &str, depth: Option<u32>) -> BTreeSet<String> {
    let cargo = option_env!("CARGO").unwrap_or("cargo");
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace()).args([
        "tree",
        "--offline",
        "-p",
        package,
        "-e",
        "normal,build",
        "--prefix",
        "none",
        "-f",
        "{p}",
    ]);
    if let Some(d) = depth {
        cmd.args(["--depth", &d.to_string()]);
    }
    let out = cmd.output().expect("run cargo tree");
    assert!(
        out.status.success(),
        "cargo tree -p {package}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// The forbidden crates found, as `package -> crate (why)` lines.
fn violations(rules: &[(&str, &[&str], &str)], depth: Option<u32>) -> Vec<String> {
    let mut found = Vec::new();
    for (package, banned, why) in rules {
        let deps = tree(package, depth);
        for b in *banned {
            if deps.contains(*b) {
                found.push(format!("{package} depends on {b} ({why})"));
            }
        }
    }
    found
}

#[test]
fn no_forbidden_dependency_edges() {
    let mut found = violations(FORBIDDEN, None);
    found.extend(violations(FORBIDDEN_DIRECT, Some(1)));
    assert!(found.is_empty(), "forbidden edges:\n{}", found.join("\n"));
}

#[test]
fn the_check_sees_an_edge_when_there_is_one() {
    // The rules are only as good as the tree they read: the node crate
    // does pull tokio and the cluster, so a rule against them must fire.
    let rule: &[(&str, &[&str], &str)] = &[("shoal-node", &["tokio", "shoal-cluster"], "probe")];
    assert_eq!(violations(rule, None).len(), 2);
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if name == "target" || name.to_string_lossy().starts_with('.') {
            continue;
        }
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn no_source_file_is_over_600_lines() {
    let mut files = Vec::new();
    rust_files(&workspace(), &mut files);
    assert!(files.len() > 50, "found only {} files", files.len());
    let long: Vec<String> = files
        .iter()
        .filter_map(|f| {
            let n = std::fs::read_to_string(f).ok()?.lines().count();
            (n > FILE_LINES_MAX).then(|| format!("{}: {n} lines", f.display()))
        })
        .collect();
    assert!(
        long.is_empty(),
        "files over {FILE_LINES_MAX} lines:\n{}",
        long.join("\n")
    );
}
