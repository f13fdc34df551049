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
    for path in ["/", "/api/tags", "/metrics", "/v1/models"] {
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

#[test]
fn a_thousand_stranger_connections_do_not_stop_a_node() {
    use std::io::Write;
    let _serial = serial();
    let model = default_model();
    let dir = tempfile::tempdir().unwrap();
    let mut node = loopback_cluster(dir.path(), &model, 1, "1G", &[]).remove(0);
    wait_plan(&mut node, 1, 1);
    let _logs = LogsOnFailure::of(&[&node]);
    let addr = node.addr_on("127.0.0.1");
    let port: u16 = addr
        .split('/')
        .skip_while(|p| *p != "tcp")
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no tcp port in {addr}"));
    // A host without the key opens 1,000 connections to the control plane
    // and starts a handshake it never finishes.
    let mut conns: Vec<std::net::TcpStream> = (0..1000)
        .filter_map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).ok())
        .collect();
    for c in &mut conns {
        let _ = c.write_all(b"\x13/multistream/1.0.0\n");
    }
    let (_, err, ok) = node.ask(&["-n", "4"], "hello");
    assert!(ok, "the node stopped serving: {err}");
    // It holds a bounded number of them (file descriptors are not used up).
    let fds = std::fs::read_dir(format!("/proc/{}/fd", node.pid()))
        .unwrap()
        .count();
    assert!(fds < 400, "{fds} open file descriptors");
    drop(conns);
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
fn kv_caches_stay_within_max_memory_and_a_request_past_it_is_refused() {
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
    let (_, err, ok) = node.ask(&["--no-template", "-n", "400"], "Once upon a time");
    if ok || !err.contains("no room") {
        let first = long.join().unwrap();
        panic!(
            "the second long request was not refused ({err}); the first: {}",
            String::from_utf8_lossy(&first.stderr)
        );
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
    // Its cache freed, the next request fits.
    let (_, err, ok) = node.ask(&["-n", "4"], "hello");
    assert!(ok, "{err}");
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

#[test]
fn a_member_sending_tokens_for_requests_it_does_not_finish_changes_nothing() {
    let _serial = serial();
    let model = default_model();
    let m = model.display().to_string();
    let dir = tempfile::tempdir().unwrap();
    let key = keyfile(dir.path(), "key");
    // 80 MiB each: two stages; every node lies when it is not the last.
    let memory = ["--max-memory", "80M"];
    let lie = [("SHOAL_FAULT_LIE", "tokens")];
    let first = loopback_node_with_env(dir.path(), &m, &key, &memory, &lie);
    let addr = first.addr_on("127.0.0.1");
    let peer = [&memory[..], &["--peer", &addr]].concat();
    let second = loopback_node_with_env(dir.path(), &m, &key, &peer, &lie);
    let mut nodes = vec![first, second];
    wait_plan(&mut nodes[0], 2, 2);
    let _logs = LogsOnFailure::of(&[&nodes[0], &nodes[1]]);
    for node in &nodes {
        for settings in SETTINGS {
            let want = run_single(&model, settings, PROMPTS[0]);
            let (got, err, ok) = node.ask(settings, PROMPTS[0]);
            assert!(ok, "{err}");
            assert_eq!(got, want, "a lying member changed the answer");
        }
    }
}
