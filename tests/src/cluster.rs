//! Clusters for tests: nodes on loopback (`--peer`) or in namespaces
//! (mDNS), waiting for their plan, and the check that matters most: the
//! same text through the cluster as on one machine.

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::{plan_size, prerequisite, run_single, shoal_bin, Lan, NodeProc};

/// Prompts every cluster is checked with.
pub const PROMPTS: [&str; 2] = ["Why is the sky blue?", "Write a haiku about fish."];

/// Greedy and seeded sampling, the flags `shoal run` and `shoal ask` share.
pub const SETTINGS: [&[&str]; 2] = [
    &["--temp", "0", "-n", "24"],
    &["--temp", "0.8", "--seed", "42", "-n", "24"],
];

/// Longest a cluster takes to agree on a plan (scaled).
pub const PLAN_WAIT: Duration = Duration::from_secs(30);

/// The cluster key file `name` in `dir`, made by `shoal keygen` (which
/// must not print it) unless it exists; its path.
pub fn keyfile(dir: &Path, name: &str) -> String {
    let path = dir.join(name);
    if path.exists() {
        // Made by an earlier cluster of the same test: keygen never
        // overwrites a key, and this one is as good.
        return path.display().to_string();
    }
    let out = Command::new(shoal_bin())
        .arg("keygen")
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success());
    let key = std::fs::read_to_string(&path).unwrap();
    let said = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert!(!said.contains(key.trim()), "keygen printed the key");
    path.display().to_string()
}

/// Flags of a test node on loopback: no mDNS, any ports.
pub const LOOPBACK: [&str; 5] = [
    "--no-mdns",
    "--listen",
    "/ip4/127.0.0.1/tcp/0",
    "--http",
    "127.0.0.1:0",
];

/// Flags every test node gets: one thread (several nodes share 2 cores),
/// a 512-token context (small KV caches).
pub const SMALL: [&str; 4] = ["-t", "1", "--ctx", "512"];

/// Starts one node on loopback ([`LOOPBACK`], [`SMALL`]).
pub fn loopback_node(dir: &Path, model: &str, key: &str, extra: &[&str]) -> NodeProc {
    loopback_node_with_env(dir, model, key, extra, &[])
}

/// [`loopback_node`] with extra environment variables (an API key, a fault hook).
pub fn loopback_node_with_env(
    dir: &Path,
    model: &str,
    key: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> NodeProc {
    let own = ["-m", model, "--cluster-key-file", key];
    NodeProc::start_with_env(
        dir,
        None,
        &[&own[..], &LOOPBACK, &SMALL, extra].concat(),
        env,
    )
}

/// Starts `n` nodes on loopback, each dialling the first with `--peer`.
pub fn loopback_cluster(
    dir: &Path,
    model: &Path,
    n: usize,
    max_memory: &str,
    extra: &[&str],
) -> Vec<NodeProc> {
    let key = keyfile(dir, "key");
    let model = model.display().to_string();
    let base = [&["--max-memory", max_memory][..], extra].concat();
    let mut nodes = vec![loopback_node(dir, &model, &key, &base)];
    let first = nodes[0].addr_on("127.0.0.1");
    for _ in 1..n {
        let args = [&base[..], &["--peer", &first]].concat();
        nodes.push(loopback_node(dir, &model, &key, &args));
    }
    nodes
}

/// Namespaces on a bridge, or `None` (said loudly; a failure under
/// `SHOAL_TEST_STRICT=1`) where this machine cannot make them.
pub fn lan_or_skip(n: usize) -> Option<Lan> {
    prerequisite("network namespaces (root and iproute2)", Lan::available()).then(|| Lan::new(n))
}

/// Starts a node in host `i` of `lan` (mDNS on, [`SMALL`]).
pub fn ns_node(
    dir: &Path,
    lan: &Lan,
    i: usize,
    key: &str,
    model: &str,
    extra: &[&str],
) -> NodeProc {
    let own = [
        "-m",
        model,
        "--cluster-key-file",
        key,
        "--http",
        "127.0.0.1:0",
    ];
    // mDNS at debug: when discovery fails, the log says what was sent and heard.
    NodeProc::start_with_env(
        dir,
        Some(&lan.hosts[i]),
        &[&own[..], &SMALL, extra].concat(),
        &[("RUST_LOG", "info,libp2p_mdns=debug")],
    )
}

/// Chromium, or `None` where it cannot be installed (said loudly; a
/// failure under `SHOAL_TEST_STRICT=1`).
pub fn chromium_or_skip() -> Option<std::path::PathBuf> {
    let chromium = crate::chromium();
    prerequisite(
        "Chromium (apt-get install chromium failed)",
        chromium.is_some(),
    )
    .then_some(chromium)
    .flatten()
}

/// Each `(node, args, prompt)` asked at once (`shoal ask`, one thread
/// each); the answers in order, every one a success.
pub fn ask_together(asks: &[(&NodeProc, &[&str], &str)]) -> Vec<String> {
    std::thread::scope(|s| {
        let handles: Vec<_> = asks
            .iter()
            .map(|&(node, args, prompt)| s.spawn(move || node.ask(args, prompt)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                let (out, err, ok) = h.join().unwrap();
                assert!(ok, "{err}");
                out
            })
            .collect()
    })
}

/// Waits until `node` sees `nodes` members and a plan of `stages` stages
/// (for clusters where the model's size leaves the planner one choice).
pub fn wait_plan(node: &mut NodeProc, nodes: usize, stages: usize) -> Value {
    wait_plan_with(node, nodes, |s| s == stages)
}

/// Waits until `node` sees `nodes` members and a plan whose number of
/// stages `stages_ok` accepts (where measured speeds may tip the planner
/// either way, a test must not demand one shape).
pub fn wait_plan_with(
    node: &mut NodeProc,
    nodes: usize,
    stages_ok: impl Fn(usize) -> bool,
) -> Value {
    node.wait_status(crate::scaled(PLAN_WAIT), |s| {
        let (members, stages) = plan_size(s);
        members == nodes && stages_ok(stages) && !s["plan"].is_null()
    })
}

/// Every prompt and setting gives the same text through `via` as on one machine.
pub fn assert_same_as_one_machine(model: &Path, via: &[&NodeProc]) {
    for prompt in PROMPTS {
        for settings in SETTINGS {
            let want = run_single(model, settings, prompt);
            for node in via {
                let (got, err, ok) = node.ask(settings, prompt);
                assert!(ok, "ask failed: {err}");
                assert_eq!(
                    got, want,
                    "prompt {prompt:?} with {settings:?} via {}",
                    node.http
                );
            }
        }
    }
}

/// A `shoal ask` running in the background, its answer still streaming.
pub struct Streaming {
    child: Child,
    /// What it printed so far.
    pub head: Vec<u8>,
}

impl Streaming {
    /// Starts `shoal ask` against `node` with `args` and `prompt`, and
    /// returns once its first bytes of answer are out (the request is
    /// then past its first token: the event tests wait for, not a sleep).
    pub fn start(node: &NodeProc, args: &[&str], prompt: &str) -> Streaming {
        let mut s = Streaming::start_waiting(node, args, prompt);
        let mut out = s.child.stdout.take().expect("piped stdout");
        let mut head = vec![0u8; 256];
        let n = out.read(&mut head).expect("read the answer");
        assert!(n > 0, "the answer ended before its first token");
        head.truncate(n);
        s.child.stdout = Some(out);
        s.head = head;
        s
    }

    /// Starts `shoal ask` against `node` without waiting for its answer
    /// (a request that may wait in line first).
    pub fn start_waiting(node: &NodeProc, args: &[&str], prompt: &str) -> Streaming {
        let child = Command::new(shoal_bin())
            .args(["ask", "--node", &node.http])
            .args(args)
            .arg(prompt)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn shoal ask");
        Streaming {
            child,
            head: Vec::new(),
        }
    }

    /// Waits for the end: (rest of stdout, stderr, success).
    pub fn finish(self) -> (String, String, bool) {
        let out = self.child.wait_with_output().expect("wait for shoal ask");
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
            out.status.success(),
        )
    }
}
