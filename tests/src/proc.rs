//! A `shoal node` process and the ways a test talks to it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::shoal_bin;

/// Prints the logs of a test's nodes if the test fails: a failed wait on
/// one node often has its cause in another's log. Holds paths, not the
/// nodes, so the test keeps using them.
pub struct LogsOnFailure(Vec<PathBuf>);

impl LogsOnFailure {
    /// Watches the logs of `nodes`.
    pub fn of(nodes: &[&NodeProc]) -> LogsOnFailure {
        LogsOnFailure(nodes.iter().map(|n| n.log.clone()).collect())
    }
}

impl Drop for LogsOnFailure {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for path in &self.0 {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
            eprintln!("--- {} (last {} lines)", path.display(), tail.len());
            eprintln!("{}", tail.join("\n"));
        }
    }
}

/// Lines of each node's log shown when a test fails.
const LOG_TAIL_LINES: usize = 150;

/// How often a wait polls the node's status.
const STATUS_POLL: Duration = Duration::from_millis(50);

/// Moves the calling thread (only it) into network namespace `ns`.
fn enter_netns(ns: &str) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(format!("/var/run/netns/{ns}"))?;
    // SAFETY: setns on a valid namespace fd affects only this thread.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The `shoal` binary as a command, run inside namespace `netns` if given.
fn shoal_in(netns: Option<&str>) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(shoal_bin());
            c
        }
        None => Command::new(shoal_bin()),
    }
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
        let mut cmd = shoal_in(netns);
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
        p.http = p.wait_log("API on ", crate::secs(60));
        p
    }

    /// Waits for a log line containing `marker`; returns what follows it.
    pub fn wait_log(&mut self, marker: &str, timeout: Duration) -> String {
        self.wait_log_any(&[marker], timeout)
    }

    /// Waits for a log line containing any of `markers`; returns what
    /// follows it (`timeout`: pass it through [`crate::secs`]).
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

    /// Waits for the process to exit by itself; whether it did in `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Kills the node at once (SIGKILL: no goodbye to its peers).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Runs a `shoal` client command (`ask`, `status`) against this node,
    /// inside its namespace.
    pub fn client(&self, sub: &str, args: &[&str]) -> Output {
        let mut cmd = shoal_in(self.netns.as_deref());
        cmd.arg(sub)
            .args(["--node", &self.http])
            .args(args)
            .output()
            .expect("run shoal client")
    }

    /// `GET /api/status` (`Null` while the node does not answer).
    pub fn status(&self) -> Value {
        self.try_get("/api/status")
            .ok()
            .and_then(|body| serde_json::from_str(&body).ok())
            .unwrap_or(Value::Null)
    }

    /// Polls status until `pred` holds; panics with the last status and log
    /// after `timeout` (pass it through [`crate::secs`]).
    pub fn wait_status(&mut self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        loop {
            let s = self.status();
            if pred(&s) {
                return s;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                panic!("node exited ({status}) while waiting for its status:\n{log}");
            }
            if start.elapsed() > timeout {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                panic!("status never matched in {timeout:?}: {s:#}\nlog:\n{log}");
            }
            std::thread::sleep(STATUS_POLL);
        }
    }

    /// `GET path` on the node's HTTP API (plain HTTP/1.0, whole body);
    /// panics when the node does not answer.
    pub fn get(&self, path: &str) -> String {
        self.try_get(path)
            .unwrap_or_else(|e| panic!("GET {path} on {}: {e}", self.http))
    }

    /// `GET path`, or why it failed. Inside the node's namespace when it
    /// has one (the request runs on a thread that enters it).
    pub fn try_get(&self, path: &str) -> std::io::Result<String> {
        let addr = self.http.trim_start_matches("http://").to_string();
        let path = path.to_string();
        let request = move || -> std::io::Result<String> {
            use std::io::Write;
            let mut s = std::net::TcpStream::connect(&addr)?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
            let text = crate::read_all(s).replace('\r', "");
            Ok(match text.split_once("\n\n") {
                Some((_, body)) => body.to_string(),
                None => text,
            })
        };
        match &self.netns {
            None => request(),
            Some(ns) => {
                let ns = ns.clone();
                std::thread::spawn(move || {
                    enter_netns(&ns)?;
                    request()
                })
                .join()
                .expect("request thread")
            }
        }
    }

    /// The value of a sample in the node's `/metrics` (the whole name,
    /// labels included, as the line starts), if it has one.
    pub fn metric(&self, name: &str) -> Option<f64> {
        self.get("/metrics").lines().find_map(|l| {
            let (n, v) = l.rsplit_once(' ')?;
            (n == name).then(|| v.trim().parse().ok()).flatten()
        })
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
