//! The status page in a real browser.

use crate::prelude::*;

#[test]
fn the_status_page_renders_the_cluster_in_chromium() {
    let _serial = serial();
    let Some(chromium) = chromium_or_skip() else {
        return;
    };
    let model = default_model();
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = loopback_cluster(dir.path(), &model, 2, "80M", &[]);
    let s = wait_plan(&mut nodes[0], 2, 2);
    let url = format!("{}/", nodes[0].http);
    let dom = shoal_tests::headless(&chromium, &url, &["--dump-dom"]);
    // Rendered by the page's script from the live status: every node and
    // the plan, node names, memory in use, the routing policy, the chart.
    assert!(dom.contains("plan epoch"), "{dom}");
    let name = s["nodes"][0]["name"].as_str().unwrap();
    assert!(!name.is_empty() && dom.contains(name), "{name}");
    assert!(dom.contains("nothing leaves this cluster"), "{dom}");
    assert!(dom.contains("<polyline id=\"line\" points=\""), "{dom}");
    assert!(
        !dom.contains("points=\"\""),
        "the chart has no point: {dom}"
    );
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
    let _serial = serial();
    let Some(chromium) = chromium_or_skip() else {
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
        let deadline = Instant::now() + secs(20);
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
    let deadline = Instant::now() + secs(20);
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
