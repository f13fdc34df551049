//! Harness for shoal's multi-node tests: real `shoal` processes on
//! loopback or in Linux network namespaces, and helpers to talk to them.
//!
//! Everything started here is stopped on drop (processes killed,
//! namespaces deleted), also when a test fails.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod synth;

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

/// The default model, fetched and cached.
pub fn default_model() -> PathBuf {
    models::default_model().expect("default model")
}

/// A `shoal node` process.
pub struct NodeProc {
    child: Child,
    /// Its HTTP API, `http://ip:port`.
    pub http: String,
    /// Its log file.
    pub log: PathBuf,
    /// Network namespace it runs in, if any.
    pub netns: Option<String>,
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

impl NodeProc {
    /// Starts `shoal node` with `args` (in namespace `netns` if given), and
    /// waits for its API line.
    pub fn start(dir: &Path, netns: Option<&str>, args: &[&str]) -> NodeProc {
        Self::start_with_env(dir, netns, args, &[])
    }

    /// [`NodeProc::start`] with extra environment variables.
    pub fn start_with_env(
        dir: &Path,
        netns: Option<&str>,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> NodeProc {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let log = dir.join(format!("node{n}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(shoal_bin());
                c
            }
            None => Command::new(shoal_bin()),
        };
        cmd.arg("node")
            .args(args)
            .env("RUST_LOG", "info,libp2p_mdns=warn")
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(file);
        let child = cmd.spawn().expect("spawn shoal node");
        let mut p = NodeProc {
            child,
            http: String::new(),
            log,
            netns: netns.map(str::to_string),
        };
        p.http = p.wait_log("API on ", Duration::from_secs(60));
        p
    }

    /// Waits for a log line containing `marker`; returns what follows it.
    pub fn wait_log(&mut self, marker: &str, timeout: Duration) -> String {
        self.wait_log_any(&[marker], timeout)
    }

    /// Waits for a log line containing any of `markers`; returns what follows it.
    pub fn wait_log_any(&mut self, markers: &[&str], timeout: Duration) -> String {
        let start = Instant::now();
        loop {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            for marker in markers {
                if let Some(line) = text.lines().find(|l| l.contains(marker)) {
                    let at = line.find(marker).expect("found") + marker.len();
                    return line[at..].trim().to_string();
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("node exited ({status}):\n{text}");
            }
            assert!(
                start.elapsed() < timeout,
                "none of {markers:?} in the log:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory, MiB.
    pub fn rss_mib(&self) -> f64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        s.lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    }

    /// Kills the node at once (SIGKILL: no goodbye to its peers).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Runs a `shoal` client command (`ask`, `status`) against this node,
    /// inside its namespace.
    pub fn client(&self, sub: &str, args: &[&str]) -> Output {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(shoal_bin());
                c
            }
            None => Command::new(shoal_bin()),
        };
        cmd.arg(sub)
            .args(["--node", &self.http])
            .args(args)
            .output()
            .expect("run shoal client")
    }

    /// `shoal status --json`.
    pub fn status(&self) -> Value {
        let out = self.client("status", &["--json"]);
        if !out.status.success() {
            return Value::Null;
        }
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    /// Polls status until `pred` holds; panics with the last status and log after `timeout`.
    pub fn wait_status(&mut self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        loop {
            let s = self.status();
            if pred(&s) {
                return s;
            }
            if start.elapsed() > timeout {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                panic!("status never matched in {timeout:?}: {s:#}\nlog:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `shoal ask` with `args` and the prompt; (stdout, stderr, success).
    pub fn ask(&self, args: &[&str], prompt: &str) -> (String, String, bool) {
        let mut a = args.to_vec();
        a.push(prompt);
        let out = self.client("ask", &a);
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
            out.status.success(),
        )
    }

    /// The node's own libp2p address on `ip` (from its status).
    pub fn addr_on(&self, ip: &str) -> String {
        let s = self.status();
        s["nodes"][0]["addrs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .find(|a| a.contains(&format!("/{ip}/")))
            .unwrap_or_else(|| panic!("no address on {ip}: {s:#}"))
            .to_string()
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Number of nodes in a status, and how many hold layers.
pub fn plan_size(s: &Value) -> (usize, usize) {
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

/// Linux network namespaces joined by a bridge: real hosts for tests.
///
/// A "switch" namespace holds the bridge; each host namespace has one
/// veth into it, address `10.<net>.0.<i+1>/24`. Dropping deletes them all.
pub struct Lan {
    /// Host namespace names.
    pub hosts: Vec<String>,
    /// Host addresses, same order.
    pub ips: Vec<String>,
    switch: String,
}

impl Lan {
    /// Whether this machine lets us make namespaces (root and `ip`).
    pub fn available() -> bool {
        let ok = Command::new("ip")
            .args(["netns", "list"])
            .output()
            .is_ok_and(|o| o.status.success());
        ok && unsafe_is_root()
    }

    /// Makes `n` hosts on one bridge.
    pub fn new(n: usize) -> Lan {
        // Unique per process and per Lan: tests run in parallel threads.
        static LANS: AtomicUsize = AtomicUsize::new(0);
        let k = LANS.fetch_add(1, Ordering::SeqCst);
        let id = format!("{}x{k}", std::process::id() % 100_000);
        let net = 100 + (std::process::id() as usize * 7 + k) % 150;
        let switch = format!("shoal{id}-sw");
        let mut lan = Lan {
            hosts: Vec::new(),
            ips: Vec::new(),
            switch: switch.clone(),
        };
        sh(&format!("ip netns add {switch}"));
        sh(&format!("ip -n {switch} link add br0 type bridge"));
        sh(&format!("ip -n {switch} link set br0 up"));
        sh(&format!("ip -n {switch} link set lo up"));
        for i in 0..n {
            let host = format!("shoal{id}-h{i}");
            let ip = format!("10.{net}.0.{}", i + 1);
            sh(&format!("ip netns add {host}"));
            sh(&format!(
                "ip -n {host} link add eth0 type veth peer name p{i} netns {switch}"
            ));
            sh(&format!("ip -n {switch} link set p{i} master br0"));
            sh(&format!("ip -n {switch} link set p{i} up"));
            sh(&format!("ip -n {host} addr add {ip}/24 dev eth0"));
            sh(&format!("ip -n {host} link set eth0 up"));
            sh(&format!("ip -n {host} link set lo up"));
            lan.hosts.push(host);
            lan.ips.push(ip);
        }
        lan
    }

    /// Stops the bridge from flooding multicast to host `i` (mDNS no longer reaches it).
    pub fn drop_multicast(&self, i: usize) {
        sh(&format!(
            "ip netns exec {} bridge link set dev p{i} mcast_flood off",
            self.switch
        ));
    }

    /// Limits what host `i` sends to `rate` (e.g. `20mbit`) with a token bucket.
    pub fn limit_rate(&self, i: usize, rate: &str) {
        sh(&format!(
            "ip netns exec {} tc qdisc add dev eth0 root tbf rate {rate} burst 32kbit latency 50ms",
            self.hosts[i]
        ));
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for h in self.hosts.iter().chain([&self.switch]) {
            // Kill anything left in the namespace, then delete it.
            let _ = Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "ip netns pids {h} | xargs -r kill -9; ip netns del {h}"
                ))
                .status();
        }
    }
}

fn unsafe_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

fn sh(cmd: &str) {
    let out = Command::new("sh").arg("-c").arg(cmd).output().expect("sh");
    assert!(
        out.status.success(),
        "`{cmd}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A UDP relay that delays every datagram, both ways: put in front of a
/// node's QUIC data plane (`--data-advertise`), it makes a slow link on
/// loopback (this kernel has no netem).
pub struct UdpRelay {
    /// Where peers send to.
    pub addr: std::net::SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl UdpRelay {
    /// Relays to `target`, delaying each datagram by `delay` plus up to `jitter`.
    pub fn start(target: std::net::SocketAddr, delay: Duration, jitter: Duration) -> UdpRelay {
        use std::collections::HashMap;
        use std::net::UdpSocket;
        use std::sync::atomic::AtomicBool;
        use std::sync::{mpsc, Arc};
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").expect("relay socket"));
        let addr = front.local_addr().expect("bound");
        let stop = Arc::new(AtomicBool::new(false));
        // One delay line: (due, socket, destination, bytes), sent in due order.
        type Item = (Instant, Arc<UdpSocket>, std::net::SocketAddr, Vec<u8>);
        let (tx, rx) = mpsc::channel::<Item>();
        std::thread::spawn(move || {
            let mut queue: Vec<Item> = Vec::new();
            loop {
                let wait = queue
                    .iter()
                    .map(|i| i.0)
                    .min()
                    .map_or(Duration::from_millis(50), |d| {
                        d.saturating_duration_since(Instant::now())
                    });
                match rx.recv_timeout(wait) {
                    Ok(item) => queue.push(item),
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
                let now = Instant::now();
                queue.sort_by_key(|i| i.0);
                while queue.first().is_some_and(|i| i.0 <= now) {
                    let (_, sock, to, bytes) = queue.remove(0);
                    let _ = sock.send_to(&bytes, to);
                }
            }
        });
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut due = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let j = jitter.as_micros() as u64;
            Instant::now() + delay + Duration::from_micros(if j == 0 { 0 } else { seed % j })
        };
        let stop2 = stop.clone();
        std::thread::spawn(move || {
            front
                .set_read_timeout(Some(Duration::from_millis(100)))
                .expect("timeout");
            let mut backs: HashMap<std::net::SocketAddr, Arc<UdpSocket>> = HashMap::new();
            let mut buf = vec![0u8; 65536];
            while !stop2.load(Ordering::Relaxed) {
                let Ok((n, client)) = front.recv_from(&mut buf) else {
                    continue;
                };
                let back = backs.entry(client).or_insert_with(|| {
                    // One socket per client towards the target; its replies go back delayed.
                    let back = Arc::new(UdpSocket::bind("127.0.0.1:0").expect("relay socket"));
                    let (reader, front, tx, stop) =
                        (back.clone(), front.clone(), tx.clone(), stop2.clone());
                    let mut due = {
                        let mut s = 0x2545_F491_4F6C_DD1Du64 ^ client.port() as u64;
                        move || {
                            s ^= s << 13;
                            s ^= s >> 7;
                            s ^= s << 17;
                            let j = jitter.as_micros() as u64;
                            Instant::now()
                                + delay
                                + Duration::from_micros(if j == 0 { 0 } else { s % j })
                        }
                    };
                    std::thread::spawn(move || {
                        reader
                            .set_read_timeout(Some(Duration::from_millis(100)))
                            .expect("timeout");
                        let mut buf = vec![0u8; 65536];
                        while !stop.load(Ordering::Relaxed) {
                            if let Ok(n) = reader.recv(&mut buf) {
                                let _ = tx.send((due(), front.clone(), client, buf[..n].to_vec()));
                            }
                        }
                    });
                    back.connect(target).expect("connect to target");
                    back
                });
                let _ = tx.send((due(), back.clone(), target, buf[..n].to_vec()));
            }
        });
        UdpRelay { addr, stop }
    }
}

impl Drop for UdpRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

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

impl NodeProc {
    /// `GET path` on the node's HTTP API (plain HTTP/1.0, whole body).
    pub fn get(&self, path: &str) -> String {
        use std::io::Write;
        let addr = self.http.trim_start_matches("http://");
        let mut s = std::net::TcpStream::connect(addr).expect("connect to the node");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
        let text = read_all(s).replace('\r', "");
        match text.split_once("\n\n") {
            Some((_, body)) => body.to_string(),
            None => text,
        }
    }
}
