//! Prometheus metrics of a node (`GET /metrics`, text format): requests,
//! tokens, time to first token, per-token latency, stage compute time, KV
//! sequences, bytes sent per link.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Labels of a per-peer metric.
pub type PeerLabels = Vec<(String, String)>;

/// Every metric of a node, cheap to update from any thread.
pub struct Metrics {
    registry: Registry,
    /// Requests this node originated that finished.
    pub requests_finished: Counter,
    /// Requests this node originated that failed.
    pub requests_failed: Counter,
    /// Requests running from this node.
    pub requests_running: Gauge,
    /// Requests waiting for a running slot.
    pub requests_queued: Gauge,
    /// Tokens generated for requests from this node.
    pub tokens: Counter,
    /// Time to first token, seconds.
    pub ttft: Histogram,
    /// Time between generated tokens, seconds.
    pub token_latency: Histogram,
    /// Time of one forward pass of this node's stage, seconds.
    pub stage_compute: Histogram,
    /// Sequences run together in one forward pass of this node's stage.
    pub batch_sequences: Histogram,
    /// Requests holding a KV cache on this node's stage.
    pub kv_sequences: Gauge,
    /// Bytes sent on the data plane, per peer.
    pub link_bytes: Family<PeerLabels, Counter>,
    /// Requests from this node that lost a stage and went on under the
    /// next plan (replayed from their tokens so far).
    pub replays: Counter,
    /// Members that vanished (no goodbye: killed, frozen, unplugged).
    pub members_lost: Counter,
    /// Members that said goodbye (SIGTERM, Ctrl-C).
    pub members_left: Counter,
    /// Members that joined (a node back from sleep or a restart rejoins).
    pub members_joined: Counter,
    /// Messages this node refused as lies (no honest node sends them).
    pub lies_caught: Counter,
    /// Tokens proposed by speculation for requests from this node.
    pub speculation_proposed: Counter,
    /// Of those, accepted.
    pub speculation_accepted: Counter,
    /// Members this node left out for lying (its own catches and others').
    pub members_excluded: Counter,
    /// Tokens streamed to this node's clients, counted as they arrive
    /// (`tokens` counts finished requests): the live rate of load reports.
    pub streamed_tokens: AtomicU64,
    /// Microseconds this node's stage has spent in forward passes.
    pub busy_us: AtomicU64,
    /// KV cache bytes this node's stage holds filled (set by the worker).
    pub kv_bytes: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut r = Registry::with_prefix("shoal");
        // 1 ms .. ~33 s: a token on a fast node to a long prompt on a slow cluster.
        let secs = || Histogram::new(exponential_buckets(0.001, 2.0, 16));
        let m = Metrics {
            requests_finished: Counter::default(),
            requests_failed: Counter::default(),
            requests_running: Gauge::default(),
            requests_queued: Gauge::default(),
            tokens: Counter::default(),
            ttft: secs(),
            token_latency: secs(),
            stage_compute: secs(),
            batch_sequences: Histogram::new(exponential_buckets(1.0, 2.0, 7)),
            kv_sequences: Gauge::default(),
            link_bytes: Family::default(),
            replays: Counter::default(),
            members_lost: Counter::default(),
            members_left: Counter::default(),
            members_joined: Counter::default(),
            lies_caught: Counter::default(),
            speculation_proposed: Counter::default(),
            speculation_accepted: Counter::default(),
            members_excluded: Counter::default(),
            streamed_tokens: AtomicU64::new(0),
            busy_us: AtomicU64::new(0),
            kv_bytes: AtomicU64::new(0),
            registry: Registry::default(),
        };
        r.register(
            "requests_finished",
            "Requests from this node that finished",
            m.requests_finished.clone(),
        );
        r.register(
            "requests_failed",
            "Requests from this node that failed",
            m.requests_failed.clone(),
        );
        r.register(
            "requests_running",
            "Requests from this node running now",
            m.requests_running.clone(),
        );
        r.register(
            "tokens_generated",
            "Tokens generated for requests from this node",
            m.tokens.clone(),
        );
        r.register(
            "time_to_first_token_seconds",
            "Time to first token",
            m.ttft.clone(),
        );
        r.register(
            "token_latency_seconds",
            "Time between generated tokens",
            m.token_latency.clone(),
        );
        r.register(
            "stage_compute_seconds",
            "One forward pass of this node's stage",
            m.stage_compute.clone(),
        );
        r.register(
            "stage_batch_sequences",
            "Sequences in one forward pass of this node's stage",
            m.batch_sequences.clone(),
        );
        r.register(
            "kv_sequences",
            "Requests holding a KV cache on this stage",
            m.kv_sequences.clone(),
        );
        r.register(
            "link_sent_bytes",
            "Bytes sent on the data plane, per peer",
            m.link_bytes.clone(),
        );
        r.register(
            "replays",
            "Requests from this node replayed on a new plan after losing a stage",
            m.replays.clone(),
        );
        r.register(
            "members_lost",
            "Members that vanished without a goodbye (evicted)",
            m.members_lost.clone(),
        );
        r.register(
            "members_left",
            "Members that left with a goodbye",
            m.members_left.clone(),
        );
        r.register(
            "members_joined",
            "Members that joined (rejoins included)",
            m.members_joined.clone(),
        );
        r.register(
            "speculation_proposed",
            "Tokens proposed by speculative decoding for requests from this node",
            m.speculation_proposed.clone(),
        );
        r.register(
            "speculation_accepted",
            "Proposed tokens accepted (the same tokens a plain run gives)",
            m.speculation_accepted.clone(),
        );
        r.register(
            "lies_caught",
            "Messages from members refused as lies",
            m.lies_caught.clone(),
        );
        r.register(
            "members_excluded",
            "Members left out of the cluster for lying",
            m.members_excluded.clone(),
        );
        Metrics { registry: r, ..m }
    }
}

/// Turns the node's counters into a [`protocol::LoadReport`] per interval.
#[derive(Debug)]
pub struct LoadMeter {
    at: Instant,
    tokens: u64,
    busy_us: u64,
}

impl LoadMeter {
    /// A meter starting now from `m`'s counters.
    pub fn new(m: &Metrics) -> Self {
        LoadMeter {
            at: Instant::now(),
            tokens: m.streamed_tokens.load(Ordering::Relaxed),
            busy_us: m.busy_us.load(Ordering::Relaxed),
        }
    }

    /// The rates since the last call (or creation); gauges as they are now.
    pub fn sample(
        &mut self,
        m: &Metrics,
        running: u32,
        queued: u32,
        sequences: u32,
    ) -> protocol::LoadReport {
        let now = Instant::now();
        let dt = now.duration_since(self.at).as_secs_f64().max(1e-3);
        let tokens = m.streamed_tokens.load(Ordering::Relaxed);
        let busy_us = m.busy_us.load(Ordering::Relaxed);
        let report = protocol::LoadReport {
            tokens_per_s: (tokens.saturating_sub(self.tokens) as f64 / dt) as f32,
            running,
            queued,
            sequences,
            busy: ((busy_us.saturating_sub(self.busy_us) as f64 / 1e6 / dt).min(1.0)) as f32,
            epoch: 0,
            rss_bytes: rss_bytes(),
            kv_bytes: m.kv_bytes.load(Ordering::Relaxed),
        };
        *self = LoadMeter {
            at: now,
            tokens,
            busy_us,
        };
        report
    }
}

impl Metrics {
    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("encoding to a String");
        out
    }

    /// Counts bytes sent to `peer`.
    pub fn sent(&self, peer: &str, bytes: usize) {
        self.link_bytes
            .get_or_create(&vec![("peer".to_string(), peer.to_string())])
            .inc_by(bytes as u64);
    }
}

/// This process's resident memory in bytes, from `/proc/self/status`
/// (Linux); 0 elsewhere.
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib << 10)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.tokens.inc_by(5);
        m.ttft.observe(0.05);
        m.sent("abc", 100);
        let t = m.render();
        assert!(t.contains("shoal_tokens_generated_total 5"), "{t}");
        assert!(
            t.contains("shoal_time_to_first_token_seconds_bucket"),
            "{t}"
        );
        assert!(
            t.contains("shoal_link_sent_bytes_total{peer=\"abc\"} 100"),
            "{t}"
        );
        assert!(t.trim_end().ends_with("# EOF"), "{t}");
    }
}
