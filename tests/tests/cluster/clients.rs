//! The clients people use against a cluster (official `openai` and
//! `ollama` Python packages, curl), a full queue, hostile HTTP clients.

use crate::prelude::*;

/// Whether curl runs here (installed with apt when missing).
fn curl_available() -> bool {
    shoal_tests::browser::tool("curl", "curl")
}

/// curl with `args` (the test checked it is installed).
fn curl(args: &[&str]) -> std::process::Output {
    std::process::Command::new("curl")
        .args(args)
        .output()
        .expect("run curl")
}

#[test]
fn the_official_openai_client_and_curl_work_against_a_two_node_cluster() {
    let _serial = serial();
    if !prerequisite("curl", curl_available()) {
        return;
    }
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
    // Structured output, tool calls and log-probabilities through the
    // pipeline, with both clients (the grammar runs on the last stage).
    let both = std::env::join_paths([clients[0].1.clone(), clients[1].1.clone()]).unwrap();
    let structured = std::process::Command::new("python3")
        .arg(format!("{}/py/structured.py", env!("CARGO_MANIFEST_DIR")))
        .arg(&nodes[0].http)
        .arg("smollm2:135m")
        .env("PYTHONPATH", both)
        .output()
        .unwrap();
    assert!(
        structured.status.success(),
        "structured.py: {}{}",
        String::from_utf8_lossy(&structured.stdout),
        String::from_utf8_lossy(&structured.stderr)
    );
    eprintln!("{}", String::from_utf8_lossy(&structured.stdout));
    // `shoal ask --format SCHEMA`: the answer is JSON valid against it.
    {
        let schema = dir.path().join("schema.json");
        std::fs::write(
            &schema,
            r#"{"type":"object","properties":{"colour":{"enum":["red","blue"]},"n":{"type":"integer","minimum":1,"maximum":9}},"required":["colour","n"],"additionalProperties":false}"#,
        )
        .unwrap();
        let flags = [
            "--format",
            schema.to_str().unwrap(),
            "--temp",
            "0",
            "-n",
            "60",
        ];
        let (out, err, ok) = nodes[1].ask(&flags, "Pick a colour and a number.");
        assert!(ok, "{err}");
        let v: Value = serde_json::from_str(out.trim()).expect(&out);
        assert!(
            ["red", "blue"].contains(&v["colour"].as_str().unwrap()),
            "{v}"
        );
        assert!((1..=9).contains(&v["n"].as_i64().unwrap()), "{v}");
    }
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
    {
        let url = format!("{}/v1/chat/completions", nodes[0].http);
        let out = curl(&[
            "-sN",
            "-H",
            "Content-Type: application/json",
            "-d",
            &body,
            &url,
        ]);
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
    // Presence and frequency penalties are applied, as on one machine
    // (and they change the answer).
    {
        let penalised = ["--temp", "0", "-n", "24", "--no-template"];
        let flags = ["--presence-penalty", "0.5", "--frequency-penalty", "1.5"];
        let want = strip(run_single(
            &model,
            &[&penalised[..], &flags].concat(),
            "Once upon a time",
        ));
        let plain = strip(run_single(&model, &penalised, "Once upon a time"));
        assert_ne!(want, plain, "the penalties changed nothing");
        let body = format!(
            r#"{{"model":"{model_id}","prompt":"Once upon a time","temperature":0,"max_tokens":24,"presence_penalty":0.5,"frequency_penalty":1.5}}"#
        );
        let url = format!("{}/v1/completions", nodes[1].http);
        let out = curl(&[
            "-s",
            "-H",
            "Content-Type: application/json",
            "-d",
            &body,
            &url,
        ]);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["choices"][0]["text"].as_str(), Some(want.as_str()), "{v}");
    }
    // The status page and its live feed.
    let curl_text = |args: &[&str]| String::from_utf8_lossy(&curl(args).stdout).into_owned();
    {
        let html = curl_text(&["-s", &format!("{}/", nodes[0].http)]);
        assert!(
            html.contains("<title>shoal</title>") && html.contains("/api/events"),
            "{html}"
        );
        let feed = curl_text(&[
            "-sN",
            "--max-time",
            "2",
            &format!("{}/api/events", nodes[0].http),
        ]);
        let first: Value =
            serde_json::from_str(feed.lines().next().unwrap().strip_prefix("data: ").unwrap())
                .unwrap();
        assert_eq!(plan_size(&first), (2, 2));
    }
    // Prometheus metrics count what just ran, and the bytes each link carried.
    {
        let m = curl_text(&["-s", &format!("{}/metrics", nodes[1].http)]);
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
        let url = format!("{}/v1/chat/completions", nodes[0].http);
        let out = curl(&[
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            "Content-Type: application/json",
            "-d",
            &body,
            &url,
        ]);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            want.to_string(),
            "{body}"
        );
    }
}

#[test]
fn a_full_queue_answers_429_with_retry_after() {
    let _serial = serial();
    if !prerequisite("curl", curl_available()) {
        return;
    }
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
    node.wait_status(secs(10), |s| {
        s["requests"]["running"].as_u64() == Some(1) && s["queued"].as_u64() == Some(1)
    });
    let (_, err, ok) = node.ask(&["-n", "4"], "hello");
    assert!(!ok && err.contains("429") && err.contains("busy"), "{err}");
    {
        let url = format!("{}/api/shoal/generate", node.http);
        let out = curl(&[
            "-s",
            "-D",
            "-",
            "-o",
            "/dev/null",
            "-H",
            "Content-Type: application/json",
            "-d",
            r#"{"prompt":"hi"}"#,
            &url,
        ]);
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
    node.wait_status(secs(10), |s| {
        s["requests"]["running"].as_u64() == Some(0) && s["queued"].as_u64() == Some(0)
    });
    let (_, err, ok) = node.ask(&["-n", "4"], "hello");
    assert!(ok, "{err}");
}

#[test]
fn slow_and_huge_http_requests_do_not_take_the_node_down() {
    let _serial = serial();
    if !prerequisite("curl", curl_available()) {
        return;
    }
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
            s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                .unwrap();
            s
        })
        .collect();
    // A body that trickles after complete headers gets 408.
    let mut trickle = std::net::TcpStream::connect(&addr).unwrap();
    trickle
        .write_all(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"prompt\":")
        .unwrap();
    assert!(
        !node.status().is_null(),
        "the node stops answering while slow clients hang"
    );
    let start = Instant::now();
    for s in &mut slow {
        s.set_read_timeout(Some(secs(15))).unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
    }
    assert!(
        start.elapsed() < secs(12),
        "slow connections held for {:?}",
        start.elapsed()
    );
    trickle.set_read_timeout(Some(secs(15))).unwrap();
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
    {
        let (data, url) = (
            format!("@{}", big.display()),
            format!("{}/api/shoal/generate", node.http),
        );
        let out = curl(&[
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            &data,
            &url,
        ]);
        assert_eq!(String::from_utf8_lossy(&out.stdout), "413");
    }
    let (_, err, ok) = node.ask(&["-n", "4"], "hello");
    assert!(ok, "{err}");
}
