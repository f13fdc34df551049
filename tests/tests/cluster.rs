//! Multi-node tests: real `shoal node` processes on loopback (`--peer`) and
//! in network namespaces (mDNS), checked against `shoal run` on one machine.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use shoal_tests::{default_model, plan_size, run_single, Lan, NodeProc};

const PROMPTS: [&str; 2] = ["Why is the sky blue?", "Write a haiku about fish."];

/// Greedy and seeded sampling, the flags `shoal run` and `shoal ask` share.
const SETTINGS: [&[&str]; 2] = [
    &["--temp", "0", "-n", "24"],
    &["--temp", "0.8", "--seed", "42", "-n", "24"],
];

fn keyfile(dir: &Path, name: &str) -> String {
    let path = dir.join(name);
    let out = std::process::Command::new(shoal_tests::shoal_bin())
        .arg("keygen")
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success());
    // The key is written, never printed.
    let key = std::fs::read_to_string(&path).unwrap();
    let said = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert!(!said.contains(key.trim()), "keygen printed the key");
    path.display().to_string()
}

/// Starts one node on loopback (no mDNS, any ports, one thread, 512-token context).
fn loopback_node(dir: &Path, model: &str, key: &str, extra: &[&str]) -> NodeProc {
    let base = [
        "-m",
        model,
        "--cluster-key-file",
        key,
        "--no-mdns",
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--http",
        "127.0.0.1:0",
        "-t",
        "1",
        "--ctx",
        "512",
    ];
    NodeProc::start(dir, None, &[&base[..], extra].concat())
}

/// Starts `n` nodes on loopback, each dialling the first with `--peer`.
fn loopback_cluster(
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

fn wait_plan(node: &mut NodeProc, nodes: usize, stages: usize) -> Value {
    node.wait_status(Duration::from_secs(20), |s| {
        plan_size(s) == (nodes, stages) && !s["plan"].is_null()
    })
}

/// Every prompt and setting gives the same text through `via` as on one machine.
fn assert_same_as_one_machine(model: &Path, via: &[&NodeProc]) {
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

#[test]
fn loopback_clusters_of_two_and_three_match_one_machine() {
    let model = default_model();
    let dir = tempfile::tempdir().unwrap();
    // 80 MiB each: no node holds the model (103 MiB at this context), two do.
    let mut two = loopback_cluster(dir.path(), &model, 2, "80M", &[]);
    let s = wait_plan(&mut two[0], 2, 2);
    for n in s["nodes"].as_array().unwrap() {
        assert!(n["id"].as_str().unwrap().starts_with("12D3"), "{n}");
        let layers = n["layers"].as_array().unwrap();
        assert!(layers[0].as_u64() < layers[1].as_u64());
        assert!(n["addrs"].as_array().unwrap()[0]
            .as_str()
            .unwrap()
            .contains("/p2p/"));
    }
    assert_same_as_one_machine(&model, &[&two[0], &two[1]]);
    drop(two);
    // 50 MiB each: only all three together hold it.
    let mut three = loopback_cluster(dir.path(), &model, 3, "50M", &[]);
    wait_plan(&mut three[1], 3, 3);
    assert_same_as_one_machine(&model, &[&three[2]]);
}

#[test]
fn a_model_no_node_can_hold_is_refused_with_how_much_is_missing() {
    let model = default_model();
    let dir = tempfile::tempdir().unwrap();
    let mut one = loopback_cluster(dir.path(), &model, 1, "60M", &[]);
    let s = one[0].wait_status(Duration::from_secs(10), |s| s["plan_error"].is_string());
    let e = s["plan_error"].as_str().unwrap();
    assert!(e.contains("MiB missing"), "{e}");
    let (_, err, ok) = one[0].ask(&["-n", "4"], "hello");
    assert!(!ok);
    assert!(err.contains("cannot serve this model"), "{err}");
}

#[test]
fn a_node_with_the_wrong_key_is_refused() {
    let model = default_model();
    let dir = tempfile::tempdir().unwrap();
    let mut a = loopback_cluster(dir.path(), &model, 1, "1G", &[]).remove(0);
    let wrong = keyfile(dir.path(), "wrong");
    let m = model.display().to_string();
    let peer = a.addr_on("127.0.0.1");
    let mut b = loopback_node(dir.path(), &m, &wrong, &["--peer", &peer]);
    // Both sides try to join each other: whichever answers first refuses
    // (and logs why), the other sees the refusal.
    let markers = ["does not hold this cluster's key", "refused by peer"];
    a.wait_log_any(&markers, Duration::from_secs(10));
    b.wait_log_any(&markers, Duration::from_secs(10));
    assert_eq!(plan_size(&a.status()).0, 1);
    assert_eq!(plan_size(&b.status()).0, 1);
}

#[test]
fn killing_a_stage_fails_its_request_and_the_cluster_replans() {
    let model = default_model();
    let dir = tempfile::tempdir().unwrap();
    // Any two of the three hold the model: the plan uses two, the third is spare.
    let mut nodes = loopback_cluster(dir.path(), &model, 3, "80M", &[]);
    let s = wait_plan(&mut nodes[0], 3, 2);
    let staged: Vec<String> = s["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| !n["layers"].is_null())
        .map(|n| n["http"].as_str().unwrap().to_string())
        .collect();
    let find = |http: &str| nodes.iter().position(|n| n.http.ends_with(http)).unwrap();
    let (asked, victim) = (find(&staged[0]), find(&staged[1]));
    let survivor = (0..3).find(|i| *i != victim).unwrap();
    let mut cmd = std::process::Command::new(shoal_tests::shoal_bin());
    cmd.args([
        "ask",
        "--node",
        &nodes[asked].http,
        "--temp",
        "0",
        "-n",
        "2000",
        "--no-template",
    ])
    .arg("Once upon a time")
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped());
    let child = cmd.spawn().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let killed_at = Instant::now();
    nodes[victim].kill();
    let out = child.wait_with_output().unwrap();
    let took = killed_at.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the request should fail");
    assert!(err.contains("error:"), "{err}");
    assert!(took < Duration::from_secs(15), "took {took:?} to fail");
    wait_plan(&mut nodes[survivor], 2, 2);
    let want = run_single(&model, SETTINGS[0], PROMPTS[0]);
    let (got, err, ok) = nodes[survivor].ask(SETTINGS[0], PROMPTS[0]);
    assert!(ok, "{err}");
    assert_eq!(got, want);
}

fn synthetic_big_model(dir: &Path) -> std::path::PathBuf {
    use shoal_tests::synth::{write_synthetic_gguf, SynthSpec};
    let path = dir.join("big.gguf");
    let spec = SynthSpec {
        n_layers: 36,
        dim: 1024,
        ffn_dim: 2816,
        n_heads: 16,
        n_kv_heads: 4,
        dtype: candle_core::quantized::GgmlDType::Q8_0,
        seed: 5,
        ..SynthSpec::default()
    };
    write_synthetic_gguf(&path, &spec).unwrap();
    path
}

#[test]
fn a_model_several_times_one_nodes_memory_is_served_and_rss_follows_the_share() {
    let dir = tempfile::tempdir().unwrap();
    let model = synthetic_big_model(dir.path());
    let file_mib = std::fs::metadata(&model).unwrap().len() >> 20;
    let cap_mib = 160;
    assert!(file_mib > 5 * cap_mib / 2, "model of {file_mib} MiB");
    // Spread evenly, so every share is large next to the process's own ~25 MiB.
    let mut nodes = loopback_cluster(
        dir.path(),
        &model,
        3,
        &format!("{cap_mib}M"),
        &["--plan-for", "throughput"],
    );
    let s = wait_plan(&mut nodes[0], 3, 3);
    let settings = ["--no-template", "--temp", "0", "-n", "8"];
    let want = run_single(&model, &settings, "abc");
    let (got, err, ok) = nodes[0].ask(&settings, "abc");
    assert!(ok, "{err}");
    assert_eq!(got, want);
    let gguf = sharding::GgufFile::open(&model).unwrap();
    let layout = sharding::ModelLayout::from_gguf(&gguf).unwrap();
    for n in s["nodes"].as_array().unwrap() {
        let l = n["layers"].as_array().unwrap();
        let range = l[0].as_u64().unwrap() as usize..l[1].as_u64().unwrap() as usize;
        let share = layout.stage_bytes(range.clone()) as f64 / 1048576.0;
        let kv = (layout.kv_bytes_per_token(range) / 2 * 512) as f64 / 1048576.0;
        let node = nodes
            .iter()
            .find(|p| p.http.ends_with(n["http"].as_str().unwrap()))
            .unwrap();
        let rss = node.rss_mib();
        eprintln!(
            "node {}: rss {rss:.1} MiB, share {share:.1} MiB, kv {kv:.1} MiB",
            node.http
        );
        assert!(
            rss <= 1.2 * share + kv,
            "rss {rss:.1} MiB for a {share:.1} MiB share"
        );
    }
}

/// Real hosts: namespaces on a bridge; skipped where this machine cannot make them.
fn lan_or_skip(n: usize) -> Option<Lan> {
    if !Lan::available() {
        eprintln!("skipped: network namespaces need root and iproute2");
        return None;
    }
    Some(Lan::new(n))
}

fn ns_node(dir: &Path, lan: &Lan, i: usize, key: &str, model: &str, extra: &[&str]) -> NodeProc {
    let base = [
        "-m",
        model,
        "--cluster-key-file",
        key,
        "--http",
        "127.0.0.1:0",
        "-t",
        "1",
        "--ctx",
        "512",
    ];
    NodeProc::start(dir, Some(&lan.hosts[i]), &[&base[..], extra].concat())
}

#[test]
fn namespaces_form_a_cluster_by_mdns_and_match_one_machine() {
    let Some(lan) = lan_or_skip(3) else { return };
    let model = default_model();
    let m = model.display().to_string();
    let dir = tempfile::tempdir().unwrap();
    let key = keyfile(dir.path(), "key");
    // One host sends through a 50 Mbit/s token bucket.
    lan.limit_rate(2, "50mbit");
    let mut nodes: Vec<NodeProc> = (0..3)
        .map(|i| ns_node(dir.path(), &lan, i, &key, &m, &["--max-memory", "50M"]))
        .collect();
    let started = Instant::now();
    wait_plan(&mut nodes[0], 3, 3);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(10), "cluster formed in {took:?}");
    // The shaped host measures its own links at the bucket's rate.
    nodes[2].wait_status(Duration::from_secs(10), |s| {
        let others = &s["nodes"].as_array().map_or(&[][..], |v| &v[1..]);
        !others.is_empty()
            && others.iter().all(|n| {
                n["link_mbit_s"]
                    .as_f64()
                    .is_some_and(|m| m > 5.0 && m < 80.0)
            })
    });
    assert_same_as_one_machine(&model, &[&nodes[1]]);
}

#[test]
fn peer_joins_where_multicast_is_dropped() {
    let Some(lan) = lan_or_skip(3) else { return };
    let model = default_model();
    let m = model.display().to_string();
    let dir = tempfile::tempdir().unwrap();
    let key = keyfile(dir.path(), "key");
    for i in 0..3 {
        lan.drop_multicast(i);
    }
    let mut a = ns_node(dir.path(), &lan, 0, &key, &m, &["--max-memory", "80M"]);
    let a_addr = a.addr_on(&lan.ips[0]);
    let mut b = ns_node(
        dir.path(),
        &lan,
        1,
        &key,
        &m,
        &["--max-memory", "80M", "--peer", &a_addr],
    );
    // No --peer: with multicast dropped it must stay alone.
    let c = ns_node(dir.path(), &lan, 2, &key, &m, &["--max-memory", "80M"]);
    wait_plan(&mut b, 2, 2);
    let s = a.wait_status(Duration::from_secs(5), |s| plan_size(s).0 == 2);
    assert_eq!(plan_size(&s), (2, 2));
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        plan_size(&c.status()).0,
        1,
        "mDNS got through: multicast was not dropped"
    );
    let want = run_single(&model, SETTINGS[0], PROMPTS[0]);
    let (got, err, ok) = b.ask(SETTINGS[0], PROMPTS[0]);
    assert!(ok, "{err}");
    assert_eq!(got, want);
}

#[test]
fn a_slow_link_measured_on_the_data_plane_keeps_its_node_out_of_the_plan() {
    let model = default_model();
    let m = model.display().to_string();
    let dir = tempfile::tempdir().unwrap();
    // Four nodes, any three hold the model; the fourth is behind a relay
    // adding 20 ms (+ up to 4 ms jitter) to every datagram sent to it.
    let mut nodes = loopback_cluster(dir.path(), &model, 3, "50M", &[]);
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let target: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let relay =
        shoal_tests::UdpRelay::start(target, Duration::from_millis(20), Duration::from_millis(4));
    let key = dir.path().join("key").display().to_string();
    let first = nodes[0].addr_on("127.0.0.1");
    let data = target.to_string();
    let advertise = relay.addr.to_string();
    let slow = loopback_node(
        dir.path(),
        &m,
        &key,
        &[
            "--max-memory",
            "50M",
            "--data",
            &data,
            "--data-advertise",
            &advertise,
            "--peer",
            &first,
        ],
    );
    let slow_http = slow.http.clone();
    let slow_entry = move |s: &Value| -> Option<Value> {
        s["nodes"]
            .as_array()?
            .iter()
            .find(|n| slow_http.ends_with(n["http"].as_str().unwrap_or("?")))
            .cloned()
    };
    let s = nodes[0].wait_status(Duration::from_secs(30), |s| {
        plan_size(s) == (4, 3)
            && slow_entry(s).is_some_and(|n| {
                n["layers"].is_null() && n["link_rtt_ms"].as_f64().is_some_and(|r| r >= 30.0)
            })
    });
    eprintln!("{s:#}");
    assert_same_as_one_machine(&model, &[&nodes[1]]);
    drop(relay);
}

#[test]
fn a_client_that_goes_away_frees_the_cache_along_the_chain() {
    let model = default_model();
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = loopback_cluster(dir.path(), &model, 3, "50M", &[]);
    wait_plan(&mut nodes[0], 3, 3);
    let mut child = std::process::Command::new(shoal_tests::shoal_bin())
        .args([
            "ask",
            "--node",
            &nodes[0].http,
            "--temp",
            "0",
            "-n",
            "5000",
            "--no-template",
        ])
        .arg("Once upon a time")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let busy = |n: &NodeProc| n.status()["sequences"].as_u64() == Some(1);
    let start = Instant::now();
    while !nodes.iter().all(busy) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "request never reached every stage"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    for n in &mut nodes {
        n.wait_status(Duration::from_secs(5), |s| {
            s["sequences"].as_u64() == Some(0)
        });
    }
    assert_eq!(nodes[0].status()["requests"]["running"].as_u64(), Some(0));
}

#[test]
fn greedy_answers_under_concurrency_equal_one_at_a_time() {
    let model = default_model();
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = loopback_cluster(dir.path(), &model, 2, "60M", &["--plan-for", "throughput"]);
    wait_plan(&mut nodes[0], 2, 2);
    // Short chats, raw text, and a prompt long enough to be cut into pieces
    // while the others decode.
    let long = "The quick brown fox jumps over the lazy dog. ".repeat(40);
    let asks: Vec<(Vec<&str>, String)> = vec![
        (vec!["--temp", "0", "-n", "20"], PROMPTS[0].into()),
        (vec!["--temp", "0", "-n", "20"], PROMPTS[1].into()),
        (
            vec!["--temp", "0", "-n", "20", "--no-template"],
            "Once upon a time".into(),
        ),
        (vec!["--temp", "0", "-n", "12", "--no-template"], long),
        (
            vec!["--temp", "0", "-n", "20"],
            "Name three colours.".into(),
        ),
        (vec!["--temp", "0", "-n", "20"], "What is 7 times 8?".into()),
    ];
    let one_at_a_time: Vec<String> = asks
        .iter()
        .enumerate()
        .map(|(i, (args, prompt))| {
            let (out, err, ok) = nodes[i % 2].ask(args, prompt);
            assert!(ok, "{err}");
            out
        })
        .collect();
    for round in 0..2 {
        let together: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = asks
                .iter()
                .enumerate()
                .map(|(i, (args, prompt))| {
                    let node = &nodes[(i + round) % 2];
                    s.spawn(move || node.ask(args, prompt))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    let (out, err, ok) = h.join().unwrap();
                    assert!(ok, "{err}");
                    out
                })
                .collect()
        });
        assert_eq!(together, one_at_a_time, "round {round}");
    }
    // Every node's load reaches the others (the page's per-node tok/s).
    nodes[1].wait_status(Duration::from_secs(5), |s| {
        s["nodes"]
            .as_array()
            .is_some_and(|ns| ns.iter().all(|n| n["load"]["busy"].is_number()))
    });
    // The stages really ran several sequences per forward pass.
    for n in &nodes {
        let text = n.get("/metrics");
        let value = |name: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or_else(|| panic!("{name} missing in {text}"))
        };
        let sum = value("shoal_stage_batch_sequences_sum ");
        let count = value("shoal_stage_batch_sequences_count ");
        assert!(
            sum > count,
            "no pass ran more than one sequence: {sum} / {count}"
        );
    }
}

#[test]
fn a_node_without_the_model_fetches_its_layers_from_peers_and_serves() {
    let model = default_model();
    let dir = tempfile::tempdir().unwrap();
    let key = keyfile(dir.path(), "key");
    let m = model.display().to_string();
    let base = ["--max-memory", "60M", "--ctx", "512"];
    let loopback = [
        "--cluster-key-file",
        &key,
        "--no-mdns",
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--http",
        "127.0.0.1:0",
        "-t",
        "1",
    ];
    // The holder sends the header chunk corrupted once.
    let holder_args = [&["-m", &m][..], &loopback[..], &base[..]].concat();
    let mut holder = NodeProc::start_with_env(
        dir.path(),
        None,
        &holder_args,
        &[("SHOAL_FAULT_CORRUPT_CHUNK", "0")],
    );
    let first = holder.addr_on("127.0.0.1");
    let cache = dir.path().join("fetcher-cache");
    let cache_env = cache.display().to_string();
    let fetcher_args = [
        &["--from-peers", "--peer", &first][..],
        &loopback[..],
        &base[..],
    ]
    .concat();
    let start_fetcher = || {
        NodeProc::start_with_env(
            dir.path(),
            None,
            &fetcher_args,
            &[("SHOAL_CACHE_DIR", cache_env.as_str())],
        )
    };
    let mut fetcher = start_fetcher();
    fetcher.wait_log("chunk failed verification", Duration::from_secs(1));
    wait_plan(&mut holder, 2, 2);
    let settings: &[&str] = &["--temp", "0", "-n", "24"];
    let want = run_single(&model, settings, PROMPTS[0]);
    for via in [&fetcher, &holder] {
        let (got, err, ok) = via.ask(settings, PROMPTS[0]);
        assert!(ok, "{err}");
        assert_eq!(got, want, "via {}", via.http);
    }
    // It holds only what it runs (and what calibration read), verified.
    let w = fetcher.status()["weights"].clone();
    assert_eq!(w["complete"], false, "{w}");
    let (have, total) = (
        w["have_bytes"].as_u64().unwrap(),
        w["total_bytes"].as_u64().unwrap(),
    );
    assert!(have < total, "{w}");
    // A restart resumes from the cache instead of starting over.
    fetcher.kill();
    let mut again = start_fetcher();
    again.wait_log("resuming a fetch", Duration::from_secs(1));
    wait_plan(&mut holder, 2, 2);
    let (got, err, ok) = again.ask(settings, PROMPTS[0]);
    assert!(ok, "{err}");
    assert_eq!(got, want);
}

#[test]
fn nodes_holding_different_models_do_not_serve_together() {
    use shoal_tests::synth::{write_synthetic_gguf, SynthSpec};
    let dir = tempfile::tempdir().unwrap();
    let (x, y) = (dir.path().join("x.gguf"), dir.path().join("y.gguf"));
    write_synthetic_gguf(
        &x,
        &SynthSpec {
            seed: 1,
            ..SynthSpec::default()
        },
    )
    .unwrap();
    write_synthetic_gguf(
        &y,
        &SynthSpec {
            seed: 2,
            ..SynthSpec::default()
        },
    )
    .unwrap();
    let mut a = loopback_cluster(dir.path(), &x, 1, "1G", &[]).remove(0);
    let key = dir.path().join("key").display().to_string();
    let (ys, first) = (y.display().to_string(), a.addr_on("127.0.0.1"));
    let mut b = loopback_node(dir.path(), &ys, &key, &["--peer", &first]);
    let other_model = |s: &Value| {
        plan_size(s).0 == 2
            && s["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n["same_model"] == false)
    };
    let sa = a.wait_status(Duration::from_secs(10), other_model);
    let sb = b.wait_status(Duration::from_secs(10), other_model);
    // The leader serves its own model alone; the other node refuses its plan.
    let (served, idle) = if sa["leader"] == sa["node_id"] {
        (&sa, &mut b)
    } else {
        (&sb, &mut a)
    };
    assert_eq!(plan_size(served), (2, 1), "{served:#}");
    let s = idle.wait_status(Duration::from_secs(10), |s| s["plan_error"].is_string());
    assert!(
        s["plan_error"].as_str().unwrap().contains("another model"),
        "{s:#}"
    );
}

/// A Python package installed once into the cache (`pip install --target`);
/// the directory to put on `PYTHONPATH`.
fn python_package(dir_name: &str, module: &str, requirement: &str) -> std::path::PathBuf {
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
fn openai_python() -> std::path::PathBuf {
    python_package("openai-1", "openai", "openai>=1.40,<2")
}

#[test]
fn the_official_openai_client_and_curl_work_against_a_two_node_cluster() {
    let model = default_model();
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = loopback_cluster(dir.path(), &model, 2, "80M", &[]);
    wait_plan(&mut nodes[0], 2, 2);
    let strip = |s: String| s.strip_suffix('\n').unwrap_or(&s).to_string();
    let chat = strip(run_single(
        &model,
        &["--temp", "0", "-n", "24"],
        "Why is the sky blue?",
    ));
    let completion = strip(run_single(
        &model,
        &["--temp", "0", "-n", "16", "--no-template"],
        "Once upon a time",
    ));
    let (chat_file, completion_file) = (
        dir.path().join("chat.txt"),
        dir.path().join("completion.txt"),
    );
    std::fs::write(&chat_file, &chat).unwrap();
    std::fs::write(&completion_file, &completion).unwrap();
    let model_id = model.file_stem().unwrap().to_string_lossy().into_owned();
    // The official clients: `openai` on the OpenAI endpoints of one node,
    // `ollama` on the Ollama endpoints of the other.
    let clients = [
        (
            "openai_client.py",
            openai_python(),
            format!("{}/v1", nodes[1].http),
        ),
        (
            "ollama_client.py",
            python_package("ollama-0", "ollama", "ollama>=0.4,<1"),
            nodes[0].http.clone(),
        ),
    ];
    for (script, path, url) in clients {
        let out = std::process::Command::new("python3")
            .arg(format!("{}/py/{script}", env!("CARGO_MANIFEST_DIR")))
            .arg(url)
            .arg(&model_id)
            .arg(&chat_file)
            .arg(&completion_file)
            .env("PYTHONPATH", &path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{script}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // curl, streaming.
    let body = format!(
        r#"{{"model":"{model_id}","messages":[{{"role":"user","content":"Why is the sky blue?"}}],"temperature":0,"max_tokens":24,"stream":true}}"#
    );
    if let Ok(out) = std::process::Command::new("curl")
        .args(["-sN", "-H", "Content-Type: application/json", "-d", &body])
        .arg(format!("{}/v1/chat/completions", nodes[0].http))
        .output()
    {
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
        let streamed: String = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .filter_map(|v| {
                v["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(str::to_string)
            })
            .collect();
        assert_eq!(streamed, chat);
    }
    // The status page and its live feed.
    let curl = |args: &[&str]| {
        std::process::Command::new("curl")
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    };
    if let Ok(html) = curl(&["-s", &format!("{}/", nodes[0].http)]) {
        assert!(
            html.contains("<title>shoal</title>") && html.contains("/api/events"),
            "{html}"
        );
        let feed = curl(&[
            "-sN",
            "--max-time",
            "2",
            &format!("{}/api/events", nodes[0].http),
        ])
        .unwrap();
        let first: Value =
            serde_json::from_str(feed.lines().next().unwrap().strip_prefix("data: ").unwrap())
                .unwrap();
        assert_eq!(plan_size(&first), (2, 2));
    }
    // Prometheus metrics count what just ran, and the bytes each link carried.
    if let Ok(m) = curl(&["-s", &format!("{}/metrics", nodes[1].http)]) {
        let value = |name: &str| {
            m.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        assert!(value("shoal_tokens_generated_total") >= 24.0, "{m}");
        assert!(value("shoal_requests_finished_total") >= 3.0, "{m}");
        assert!(
            m.contains("shoal_time_to_first_token_seconds_bucket"),
            "{m}"
        );
        assert!(m.contains("shoal_link_sent_bytes_total{peer="), "{m}");
    }
    // Bad input: wrong types, unknown fields, not JSON.
    for (body, want) in [
        (r#"{"model":"x","messages":"hi"}"#.to_string(), 400),
        (
            format!(r#"{{"model":"{model_id}","messages":[],"bogus":1}}"#),
            400,
        ),
        ("not json".to_string(), 400),
    ] {
        let out = std::process::Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-H",
                "Content-Type: application/json",
                "-d",
                &body,
            ])
            .arg(format!("{}/v1/chat/completions", nodes[0].http))
            .output();
        if let Ok(out) = out {
            assert_eq!(
                String::from_utf8_lossy(&out.stdout),
                want.to_string(),
                "{body}"
            );
        }
    }
}

#[test]
fn the_status_page_renders_the_cluster_in_chromium() {
    let Some(chromium) = shoal_tests::chromium() else {
        eprintln!("skipped: Chromium could not be installed (apt-get install chromium)");
        return;
    };
    let model = default_model();
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = loopback_cluster(dir.path(), &model, 2, "80M", &[]);
    let s = wait_plan(&mut nodes[0], 2, 2);
    let url = format!("{}/", nodes[0].http);
    let dom = shoal_tests::headless(&chromium, &url, &["--dump-dom"]);
    // Rendered by the page's script from the live status: every node and the plan.
    assert!(dom.contains("plan epoch"), "{dom}");
    for n in s["nodes"].as_array().unwrap() {
        let id = n["id"].as_str().unwrap();
        assert!(
            dom.contains(&id[id.len() - 6..]),
            "node {id} missing from the page"
        );
    }
    // The screenshot is kept as a test artifact.
    let artifacts =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = artifacts.join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    shoal_tests::headless(
        &chromium,
        &url,
        &[&format!("--screenshot={}", shot.display())],
    );
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 20_000,
        "{} bytes",
        png.len()
    );
}

#[test]
fn the_live_page_shows_a_node_joining_and_leaving_within_two_seconds() {
    let Some(chromium) = shoal_tests::chromium() else {
        eprintln!("skipped: Chromium could not be installed (apt-get install chromium)");
        return;
    };
    let ws = python_package("websocket-1", "websocket", "websocket-client>=1.6,<2");
    let model = default_model();
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = loopback_cluster(dir.path(), &model, 2, "80M", &[]);
    wait_plan(&mut nodes[0], 2, 2);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let profile = dir.path().join("chromium-profile");
    let browser = std::process::Command::new(&chromium)
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--remote-allow-origins=*",
            &format!("--remote-debugging-port={port}"),
            &format!("--user-data-dir={}", profile.display()),
        ])
        .arg(format!("{}/", nodes[0].http))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let watcher = std::process::Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/py/page_watch.py"))
        .arg(port.to_string())
        .env("PYTHONPATH", &ws)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _browser = Kill(browser);
    let mut watcher = Kill(watcher);
    // (rows, unix ms) each time the page's node table changes.
    let (tx, rx) = std::sync::mpsc::channel::<(u64, u128)>();
    let out = watcher.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            let mut f = line.split_whitespace();
            if let (Some(Ok(n)), Some(Ok(t))) = (f.next().map(str::parse), f.next().map(str::parse))
            {
                let _ = tx.send((n, t));
            }
        }
    });
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
    };
    let page_shows = |rows: u64| -> u128 {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((n, t)) if n == rows => return t,
                Ok(_) => {}
                Err(_) => panic!("the page never showed {rows} nodes"),
            }
        }
    };
    page_shows(2);
    // A third node joins: from the moment the cluster knows it, the page
    // has 2 s.
    let key = dir.path().join("key").display().to_string();
    let first = nodes[0].addr_on("127.0.0.1");
    let m = model.display().to_string();
    let mut third = loopback_node(
        dir.path(),
        &m,
        &key,
        &["--max-memory", "80M", "--peer", &first],
    );
    let mut joined = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while joined == 0 {
        assert!(Instant::now() < deadline, "the third node never joined");
        if nodes[0].status()["nodes"].as_array().map(Vec::len) == Some(3) {
            joined = now_ms();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let shown = page_shows(3);
    let join_ms = shown.saturating_sub(joined);
    // And leaves: from the kill.
    third.kill();
    let left = now_ms();
    let gone = page_shows(2);
    let leave_ms = gone.saturating_sub(left);
    eprintln!("page: join shown after {join_ms} ms, leave after {leave_ms} ms");
    assert!(join_ms <= 2000, "join shown after {join_ms} ms");
    assert!(leave_ms <= 2000, "leave shown after {leave_ms} ms");
}

#[test]
fn a_full_queue_answers_429_with_retry_after() {
    let model = default_model();
    let dir = tempfile::tempdir().unwrap();
    let extra = ["--max-running", "1", "--max-queued", "1"];
    let mut node = loopback_cluster(dir.path(), &model, 1, "1G", &extra).remove(0);
    wait_plan(&mut node, 1, 1);
    let long = |n: &NodeProc| {
        std::process::Command::new(shoal_tests::shoal_bin())
            .args([
                "ask",
                "--node",
                &n.http,
                "--temp",
                "0",
                "-n",
                "3000",
                "--no-template",
                "Once",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let (mut running, mut waiting) = (long(&node), long(&node));
    node.wait_status(Duration::from_secs(10), |s| {
        s["requests"]["running"].as_u64() == Some(1) && s["queued"].as_u64() == Some(1)
    });
    let (_, err, ok) = node.ask(&["-n", "4"], "hello");
    assert!(!ok && err.contains("429") && err.contains("busy"), "{err}");
    if let Ok(out) = std::process::Command::new("curl")
        .args([
            "-s",
            "-D",
            "-",
            "-o",
            "/dev/null",
            "-H",
            "Content-Type: application/json",
        ])
        .args(["-d", r#"{"prompt":"hi"}"#])
        .arg(format!("{}/api/shoal/generate", node.http))
        .output()
    {
        let head = String::from_utf8_lossy(&out.stdout).to_lowercase();
        assert!(
            head.starts_with("http/1.1 429") && head.contains("retry-after: 1"),
            "{head}"
        );
    }
    running.kill().unwrap();
    waiting.kill().unwrap();
    let _ = (running.wait(), waiting.wait());
    // Both slots free again once their clients are gone.
    node.wait_status(Duration::from_secs(10), |s| {
        s["requests"]["running"].as_u64() == Some(0) && s["queued"].as_u64() == Some(0)
    });
    let (_, err, ok) = node.ask(&["-n", "4"], "hello");
    assert!(ok, "{err}");
}

#[test]
fn slow_and_huge_http_requests_do_not_take_the_node_down() {
    use std::io::{Read, Write};
    let model = default_model();
    let dir = tempfile::tempdir().unwrap();
    let mut node = loopback_cluster(dir.path(), &model, 1, "1G", &[]).remove(0);
    wait_plan(&mut node, 1, 1);
    let addr = node.http.trim_start_matches("http://").to_string();
    // Slowloris: headers that never finish are cut off after the header timeout.
    let mut slow: Vec<std::net::TcpStream> = (0..8)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(&addr).unwrap();
            s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
                .unwrap();
            s
        })
        .collect();
    // A body that trickles after complete headers gets 408.
    let mut trickle = std::net::TcpStream::connect(&addr).unwrap();
    trickle
        .write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"prompt\":")
        .unwrap();
    assert!(
        !node.status().is_null(),
        "the node stops answering while slow clients hang"
    );
    let start = Instant::now();
    for s in &mut slow {
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
    }
    assert!(
        start.elapsed() < Duration::from_secs(12),
        "slow connections held for {:?}",
        start.elapsed()
    );
    trickle
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut answer = [0u8; 12];
    let _ = trickle.read_exact(&mut answer);
    assert_eq!(
        &answer,
        b"HTTP/1.1 408",
        "{}",
        String::from_utf8_lossy(&answer)
    );
    // A body over the limit is refused with 413, and the node carries on.
    let big = dir.path().join("big.json");
    std::fs::write(&big, format!(r#"{{"prompt":"{}"}}"#, "a".repeat(3 << 20))).unwrap();
    if let Ok(out) = std::process::Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            "Content-Type: application/json",
        ])
        .arg("--data-binary")
        .arg(format!("@{}", big.display()))
        .arg(format!("{}/api/shoal/generate", node.http))
        .output()
    {
        assert_eq!(String::from_utf8_lossy(&out.stdout), "413");
    }
    let (_, err, ok) = node.ask(&["-n", "4"], "hello");
    assert!(ok, "{err}");
}
