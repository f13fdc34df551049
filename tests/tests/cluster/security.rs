//! What a host without the keys, or a web page, can do to a node
//! (issue 14): the API's key on every route, Host and Origin checks, keys
//! kept off the command line.

use crate::prelude::*;

/// curl with `args`; `(status code, body)`.
fn curl_code(args: &[&str]) -> (String, String) {
    let out = std::process::Command::new("curl")
        .args(["-s", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.to_string(), body.to_string())
}

#[test]
fn the_api_key_guards_every_route_and_foreign_hosts_and_origins_are_refused() {
    let _serial = serial();
    if !prerequisite("curl", shoal_tests::browser::tool("curl", "curl")) {
        return;
    }
    let model = default_model().display().to_string();
    let dir = tempfile::tempdir().unwrap();
    let key = keyfile(dir.path(), "key");
    let secret = "test-api-key-5d1f";
    let node = loopback_node_with_env(
        dir.path(),
        &model,
        &key,
        &["--max-memory", "1G"],
        &[("SHOAL_API_KEY", secret)],
    );
    let _logs = LogsOnFailure::of(&[&node]);
    let auth = format!("Authorization: Bearer {secret}");
    let url = |path: &str| format!("{}{path}", node.http);
    let start = Instant::now();
    let planned = || {
        let body = curl_code(&["-H", &auth, &url("/api/status")]).1;
        serde_json::from_str::<Value>(&body).is_ok_and(|s| plan_size(&s) == (1, 1))
    };
    while !planned() {
        assert!(start.elapsed() < secs(60), "no plan");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Without the key: every route, status and page included, is 401.
    for path in [
        "/",
        "/api/status",
        "/api/events",
        "/metrics",
        "/api/tags",
        "/api/version",
        "/api/ps",
        "/health",
        "/v1/models",
        "/no/such/route",
    ] {
        let (code, _) = curl_code(&["-m", "5", &url(path)]);
        assert_eq!(code, "401", "GET {path} without the key");
        let (code, _) = curl_code(&["-m", "5", "-H", "Authorization: Bearer wrong", &url(path)]);
        assert_eq!(code, "401", "GET {path} with a wrong key");
    }
    let body = r#"{"model":"x","messages":[{"role":"user","content":"hi"}],"max_tokens":2}"#;
    let (code, _) = curl_code(&[
        "-d",
        body,
        "-H",
        "Content-Type: application/json",
        &url("/v1/chat/completions"),
    ]);
    assert_eq!(code, "401");
    // The page comes with its 401 and asks for the key itself.
    let (_, page) = curl_code(&[&url("/")]);
    assert!(page.contains("const needsKey = true"), "{page}");
    // With the key.
    for path in [
        "/",
        "/api/tags",
        "/api/ps",
        "/health",
        "/metrics",
        "/v1/models",
    ] {
        assert_eq!(
            curl_code(&["-H", &auth, &url(path)]).0,
            "200",
            "GET {path} with the key"
        );
    }
    // A name this node is not (DNS rebinding), key or not: 403.
    for host in [
        "evil.example",
        "evil.example:8080",
        "attacker.localhost.evil",
    ] {
        let h = format!("Host: {host}");
        assert_eq!(
            curl_code(&["-H", &h, "-H", &auth, &url("/api/tags")]).0,
            "403",
            "{host}"
        );
        assert_eq!(curl_code(&["-H", &h, &url("/api/tags")]).0, "403", "{host}");
    }
    // A page of another origin: 403; the node's own page: served.
    let port = node.http.rsplit(':').next().unwrap();
    for (origin, want) in [
        ("http://evil.example".to_string(), "403"),
        ("null".to_string(), "403"),
        (format!("http://127.0.0.1:{port}"), "200"),
    ] {
        let o = format!("Origin: {origin}");
        assert_eq!(
            curl_code(&["-H", &o, "-H", &auth, &url("/v1/models")]).0,
            want,
            "{origin}"
        );
    }
}

#[test]
fn keys_stay_off_the_command_line_and_an_open_api_is_asked_for() {
    let model = default_model().display().to_string();
    let dir = tempfile::tempdir().unwrap();
    let key = keyfile(dir.path(), "key");
    let node = |extra: &[&str]| {
        let args = [
            &[
                "node",
                "-m",
                &model,
                "--cluster-key-file",
                &key,
                "--no-mdns",
            ][..],
            extra,
        ]
        .concat();
        std::process::Command::new(shoal_tests::shoal_bin())
            .args(args)
            .env_remove("SHOAL_API_KEY")
            .output()
            .unwrap()
    };
    let out = node(&["--http", "0.0.0.0:0"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--open-api"), "{err}");
    let out = node(&["--api-key", "hunter2"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--api-key-file"),
        "{err}"
    );
    // A key file others can read is refused.
    let loose = dir.path().join("api.key");
    std::fs::write(&loose, "k3y\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = node(&["--api-key-file", loose.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("chmod 600"), "{err}");
}

/// Holds 1,000 connections to a control port, each with a libp2p
/// handshake started and never finished; prints `ready N`, then waits for
/// its stdin to close.
const HOG: &str = r#"
import resource, socket, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
held = []
for _ in range(1000):
    try:
        s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
        s.sendall(b"\x13/multistream/1.0.0\n")
        held.append(s)
    except OSError:
        pass
print("ready", len(held), flush=True)
sys.stdin.read()
"#;

/// The files under `dir` hold this many bytes together.
fn bytes_under(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => bytes_under(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

#[test]
fn a_host_without_the_key_on_the_lan_gets_nothing_and_cannot_stop_a_node() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    let _serial = serial();
    let Some(lan) = lan_or_skip(4) else { return };
    let model = default_model();
    let m = model.display().to_string();
    let dir = tempfile::tempdir().unwrap();
    let key = keyfile(dir.path(), "key");
    let other = keyfile(dir.path(), "other");
    let memory = ["--max-memory", "80M"];
    let mut a = ns_node(dir.path(), &lan, 0, &key, &m, &memory);
    let b = ns_node(dir.path(), &lan, 1, &key, &m, &memory);
    wait_plan(&mut a, 2, 2);
    // Host 2: a node with another key, found by mDNS: it cannot join.
    let mut stranger = ns_node(dir.path(), &lan, 2, &other, &m, &memory);
    let _logs = LogsOnFailure::of(&[&a, &b, &stranger]);
    stranger.wait_log("does not hold this cluster's key", secs(30));
    // Host 3: a node without the model asking for it: no index, no chunk.
    let a_addr = a.addr_on(&lan.ips[0]);
    let cache = dir.path().join("stranger-cache");
    let fetch_log = dir.path().join("stranger-fetch.log");
    let mut fetch = Command::new("ip")
        .args(["netns", "exec", &lan.hosts[3]])
        .arg(shoal_tests::shoal_bin())
        .args(["node", "--from-peers", "--peer", &a_addr, "--no-mdns"])
        .args(["--cluster-key-file", &other, "--http", "127.0.0.1:0"])
        .env("SHOAL_CACHE_DIR", &cache)
        .stdout(std::fs::File::create(&fetch_log).unwrap())
        .stderr(Stdio::from(
            std::fs::File::options()
                .append(true)
                .open(&fetch_log)
                .unwrap(),
        ))
        .spawn()
        .unwrap();
    let start = Instant::now();
    let refused = loop {
        let log = std::fs::read_to_string(&fetch_log).unwrap_or_default();
        if log.contains("weights are for holders of this cluster's key")
            || start.elapsed() > secs(30)
        {
            break log;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = fetch.kill();
    let _ = fetch.wait();
    assert!(
        refused.contains("weights are for holders of this cluster's key"),
        "{refused}"
    );
    assert_eq!(bytes_under(&cache), 0, "it got model bytes: {refused}");
    let s = a.status();
    assert_eq!(plan_size(&s).0, 2, "a stranger became a member: {s:#}");
    drop(stranger);
    // Host 3 again: 1,000 connections with a handshake never finished,
    // against a node that has served (its memory as in use).
    let want = run_single(&model, SETTINGS[0], PROMPTS[0]);
    assert_eq!(a.ask(SETTINGS[0], PROMPTS[0]).0, want);
    let rss_before = a.rss_mib();
    let port = a_addr
        .split('/')
        .skip_while(|p| *p != "tcp")
        .nth(1)
        .unwrap()
        .to_string();
    let mut hog = Command::new("ip")
        .args(["netns", "exec", &lan.hosts[3], "python3", "-c", HOG])
        .args([&lan.ips[0], &port])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    std::io::BufReader::new(hog.stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    let held: usize = ready
        .trim()
        .trim_start_matches("ready ")
        .parse()
        .unwrap_or(0);
    // The kernel completes TCP handshakes into the listen backlog whether
    // or not the node accepts them: most of the 1,000 succeed.
    assert!(held >= 500, "only {held} connections: {ready}");
    for node in [&a, &b] {
        let (got, err, ok) = node.ask(SETTINGS[0], PROMPTS[0]);
        assert!(ok, "the node stopped serving: {err}");
        assert_eq!(got, want);
    }
    let fds = std::fs::read_dir(format!("/proc/{}/fd", a.pid()))
        .unwrap()
        .count();
    let grown = a.rss_mib() - rss_before;
    drop(hog.stdin.take());
    let _ = hog.wait();
    // File descriptors and memory stay bounded (the connection limits).
    assert!(fds < 400, "{fds} open file descriptors");
    assert!(
        grown < 64.0,
        "RSS grew {grown:.0} MiB under the connections"
    );
    println!("1,000 connections from a host without the key: {held} held, node at {fds} fds, RSS +{grown:.1} MiB");
}

#[test]
fn a_panicking_pass_fails_its_request_at_once_and_the_node_serves_on() {
    let _serial = serial();
    let model = default_model().display().to_string();
    let dir = tempfile::tempdir().unwrap();
    let key = keyfile(dir.path(), "key");
    let mut node = loopback_node_with_env(
        dir.path(),
        &model,
        &key,
        &["--max-memory", "1G"],
        &[("SHOAL_FAULT_PANIC_PASS", "1")],
    );
    wait_plan(&mut node, 1, 1);
    let _logs = LogsOnFailure::of(&[&node]);
    let start = Instant::now();
    let (_, err, ok) = node.ask(&["-n", "4"], "hello");
    assert!(!ok && err.contains("crashed"), "{err}");
    assert!(
        start.elapsed() < secs(30),
        "the failure took {:?}",
        start.elapsed()
    );
    let (_, err, ok) = node.ask(&["-n", "4"], "hello");
    assert!(ok, "the node stopped serving after a panic: {err}");
}

#[test]
fn kv_caches_stay_within_max_memory_and_a_request_past_it_waits_for_room() {
    let _serial = serial();
    let model = default_model();
    // Weights (as the planner counts them) plus 16 MiB: room for one
    // full-context KV cache (512 positions × 22.5 KiB for SmolLM2 = 11.25
    // MiB), not for two long answers (each holds what it can reach: prompt
    // + 400 tokens = ~9 MiB).
    let gguf = sharding::GgufFile::open(&model).unwrap();
    let layout = sharding::ModelLayout::from_gguf(&gguf).unwrap();
    let n = layout.layers.len();
    let weights = sharding::ModelSpec::from_layout(&layout, 0, 2).stage_memory(0..n);
    let memory = (weights + (16 << 20)).to_string();
    let dir = tempfile::tempdir().unwrap();
    let mut node = loopback_cluster(dir.path(), &model, 1, &memory, &[]).remove(0);
    wait_plan(&mut node, 1, 1);
    let _logs = LogsOnFailure::of(&[&node]);
    let http = node.http.clone();
    let long = std::thread::spawn(move || {
        std::process::Command::new(shoal_tests::shoal_bin())
            .args([
                "ask",
                "--node",
                &http,
                "--no-template",
                "-n",
                "400",
                "--temp",
                "0",
            ])
            .arg("Once upon a time, in a small village by the sea,")
            .output()
            .unwrap()
    });
    // Its cache is held at the stage.
    node.wait_status(secs(30), |s| s["sequences"].as_u64() >= Some(1));
    // A second long answer has no room beside it: it waits in line (the
    // stage never holds both caches) and runs when the first is done.
    let second =
        Streaming::start_waiting(&node, &["--no-template", "-n", "400"], "Once upon a time");
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(2) {
        assert!(
            node.status()["sequences"].as_u64() <= Some(1),
            "both caches held"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // A short answer still fits beside the long one.
    let (_, err, ok) = node.ask(&["-n", "4"], "hello");
    assert!(ok, "{err}");
    let out = long.join().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, err, ok) = second.finish();
    assert!(ok, "the waiting request: {err}");
}

#[test]
fn one_client_cannot_take_every_http_slot() {
    let _serial = serial();
    if !prerequisite("curl", shoal_tests::browser::tool("curl", "curl")) {
        return;
    }
    let model = default_model();
    let dir = tempfile::tempdir().unwrap();
    let mut node = loopback_cluster(dir.path(), &model, 1, "1G", &[]).remove(0);
    wait_plan(&mut node, 1, 1);
    let addr = node.http.trim_start_matches("http://").to_string();
    // 600 idle connections from 127.0.0.1: more than the node's 512 slots.
    let hogs: Vec<std::net::TcpStream> = (0..600)
        .filter_map(|_| std::net::TcpStream::connect(&addr).ok())
        .collect();
    assert!(hogs.len() > 512);
    // Another client (127.0.0.2) is still served at once.
    let (code, _) = curl_code(&[
        "--interface",
        "127.0.0.2",
        "-m",
        "3",
        &format!("{}/api/version", node.http),
    ]);
    assert_eq!(code, "200");
    drop(hogs);
}

/// The members `s` (a status) lists.
fn member_ids(s: &serde_json::Value) -> Vec<String> {
    s["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n["id"].as_str().map(String::from))
        .collect()
}

#[test]
fn a_member_that_lies_is_left_out_and_the_others_answer_as_one_machine() {
    let _serial = serial();
    let model = default_model();
    let m = model.display().to_string();
    // Each lie from a node holding the key, placed where it lands (see
    // `fault.rs`: the liar leads and claims speed, so it holds layers):
    // tokens to the origin for requests it does not finish, a second
    // Begin under a request's id, activations too wide, NaN activations,
    // a plan for layers that do not exist.
    let lies = [
        ("tokens", "tokens for request"),
        ("hijack", "already in use"),
        ("dims", "wide, the model's are"),
        ("nan", "activations that are not finite"),
        ("plan", "layers, the model has"),
    ];
    for (lie, caught_as) in lies {
        let dir = tempfile::tempdir().unwrap();
        let key = keyfile(dir.path(), "key");
        // 80 MiB each: any two hold the model.
        let memory = ["--max-memory", "80M"];
        let mut a = loopback_node(dir.path(), &m, &key, &memory);
        let addr = a.addr_on("127.0.0.1");
        let peer = [&memory[..], &["--peer", &addr]].concat();
        let env = [("SHOAL_FAULT_LIE", lie)];
        let mut liar = loopback_node_with_env(dir.path(), &m, &key, &peer, &env);
        let b = loopback_node(dir.path(), &m, &key, &peer);
        let _logs = LogsOnFailure::of(&[&a, &liar, &b]);
        let liar_id = liar
            .wait_status(secs(60), |s| s["node_id"].is_string())
            .get("node_id")
            .and_then(|v| v.as_str())
            .unwrap()
            .to_string();
        if lie != "plan" {
            let s = wait_plan_with(&mut a, 3, |stages| stages >= 2);
            let staged = s["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n["id"] == liar_id.as_str() && !n["layers"].is_null());
            assert!(staged, "{lie}: the liar holds no layers: {s:#}");
        }
        // Requests the lie lands on may fail; then the liar is out and
        // the two others plan without it.
        let start = std::time::Instant::now();
        loop {
            let _ = a.ask(SETTINGS[0], PROMPTS[0]);
            let s = a.status();
            let ids = member_ids(&s);
            if ids.len() == 2 && !ids.contains(&liar_id) && !s["plan"].is_null() {
                break;
            }
            assert!(
                start.elapsed() < secs(90),
                "{lie}: the liar was not left out: {s:#}"
            );
        }
        for node in [&a, &b] {
            for settings in SETTINGS {
                let want = run_single(&model, settings, PROMPTS[0]);
                let (got, err, ok) = node.ask(settings, PROMPTS[0]);
                assert!(ok, "{lie}: {err}");
                assert_eq!(got, want, "{lie}: the answer changed after a liar");
            }
            // Both left it out, and it stays out (its joins are refused).
            assert!(!member_ids(&node.status()).contains(&liar_id), "{lie}");
            let metrics = node.get("/metrics");
            assert!(
                metrics.contains("shoal_members_excluded_total 1"),
                "{lie}: {metrics}"
            );
        }
        // Caught for what it did (by whichever node it lied to).
        let logs = [&a, &b].map(|n| std::fs::read_to_string(&n.log).unwrap_or_default());
        assert!(
            logs.iter().any(|l| l.contains(caught_as)),
            "{lie}: not caught as {caught_as:?}"
        );
        // It is told so when it asks to join again.
        liar.wait_log("left out of this cluster for lying", secs(60));
    }
}
