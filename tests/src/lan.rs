//! Real test hosts: Linux network namespaces joined by a bridge, where
//! multicast (mDNS) works as on a LAN. Needs root and iproute2.

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

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
    /// Whether this machine lets us make namespaces: root, and iproute2
    /// (`ip`, `bridge`, `tc`; installed with apt when missing).
    pub fn available() -> bool {
        let ip = || {
            Command::new("ip")
                .args(["netns", "list"])
                .output()
                .is_ok_and(|o| o.status.success())
        };
        unsafe_is_root() && (ip() || (crate::browser::apt_install("iproute2") && ip()))
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

    /// Splits the network: `hosts` move to a second bridge, cut off from
    /// the others (each side still reaches its own).
    pub fn split(&self, hosts: &[usize]) {
        let sw = &self.switch;
        let _ = Command::new("ip")
            .args(["-n", sw, "link", "add", "br1", "type", "bridge"])
            .status();
        sh(&format!("ip -n {sw} link set br1 up"));
        for i in hosts {
            sh(&format!("ip -n {sw} link set p{i} master br1"));
        }
    }

    /// Undoes [`Lan::split`]: every host on the one bridge again.
    pub fn heal(&self) {
        let sw = &self.switch;
        for i in 0..self.hosts.len() {
            sh(&format!("ip -n {sw} link set p{i} master br0"));
        }
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
