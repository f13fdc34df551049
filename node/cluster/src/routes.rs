//! Where this node's API sent requests — the cluster ("local") or an
//! upstream OpenAI-compatible service — and the routing policy in force,
//! counted for the status page, `shoal status` and `/metrics`. The API
//! decides the route (`shoal-api`'s `route` module); this only keeps the
//! record, so there is one status and one metrics registry.

use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// The route of requests the cluster answered.
pub const LOCAL: &str = "local";

/// How a routed request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// Sent on (to the cluster, or to an upstream that answered 2xx).
    Sent,
    /// The upstream failed (error status, timeout, unreachable).
    Failed,
    /// The policy kept it from leaving (private, or no policy for it).
    Refused,
}

/// One route's counts.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RouteStats {
    /// `local`, or the upstream's name.
    pub route: String,
    /// Requests sent this way.
    pub requests: u64,
    /// Of those, failed upstream.
    pub failed: u64,
    /// Requests the policy kept from this route.
    pub refused: u64,
    /// Completion tokens the upstream reported (whole answers, streams
    /// with usage); local tokens are in the node's request counters.
    pub tokens: u64,
    /// Sum of the times to the upstream's first byte, ms (÷ requests for
    /// the mean).
    pub first_byte_ms: f64,
}

/// An upstream as shown (its key never is).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct UpstreamInfo {
    /// Its name: models under it are `NAME/model`.
    pub name: String,
    /// Its base URL.
    pub url: String,
}

/// The routing policy and what it did.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Routing {
    /// The policy in words, one rule per line; empty: nothing leaves.
    pub policy: Vec<String>,
    /// The upstreams configured.
    pub upstreams: Vec<UpstreamInfo>,
    /// Counts per route.
    pub routes: Vec<RouteStats>,
}

/// A metric family of the route counters: name, help, the value per route.
type Family = (&'static str, &'static str, fn(&RouteStats) -> f64);

/// The record the API writes and status reads.
#[derive(Debug, Default)]
pub struct RouteBook {
    inner: Mutex<Routing>,
}

impl RouteBook {
    /// Shows the policy and upstreams (once, at start).
    pub fn set_policy(&self, policy: Vec<String>, upstreams: Vec<UpstreamInfo>) {
        let mut r = self.inner.lock().expect("route book");
        r.policy = policy;
        r.upstreams = upstreams;
    }

    /// Counts one request on `route`.
    pub fn record(&self, route: &str, outcome: Outcome, tokens: u64, first_byte_ms: f64) {
        let mut r = self.inner.lock().expect("route book");
        let i = match r.routes.iter().position(|s| s.route == route) {
            Some(i) => i,
            None => {
                r.routes.push(RouteStats {
                    route: route.to_string(),
                    ..RouteStats::default()
                });
                r.routes.len() - 1
            }
        };
        let s = &mut r.routes[i];
        match outcome {
            Outcome::Refused => s.refused += 1,
            Outcome::Failed => {
                s.requests += 1;
                s.failed += 1;
            }
            Outcome::Sent => s.requests += 1,
        }
        s.tokens += tokens;
        s.first_byte_ms += first_byte_ms;
    }

    /// Adds tokens counted after the request was recorded (a stream's
    /// usage comes at its end).
    pub fn add_tokens(&self, route: &str, tokens: u64) {
        let mut r = self.inner.lock().expect("route book");
        if let Some(s) = r.routes.iter_mut().find(|s| s.route == route) {
            s.tokens += tokens;
        }
    }

    /// A copy for status.
    pub fn snapshot(&self) -> Routing {
        self.inner.lock().expect("route book").clone()
    }

    /// The counters in OpenMetrics text (appended to the node's metrics).
    pub fn metrics_text(&self) -> String {
        let r = self.snapshot();
        let mut out = String::new();
        let families: [Family; 4] = [
            (
                "route_requests",
                "Requests sent per route (local or an upstream)",
                |s| s.requests as f64,
            ),
            ("route_failed", "Requests an upstream failed", |s| {
                s.failed as f64
            }),
            (
                "route_refused",
                "Requests the routing policy kept from a route",
                |s| s.refused as f64,
            ),
            (
                "route_tokens",
                "Completion tokens reported per upstream route",
                |s| s.tokens as f64,
            ),
        ];
        for (name, help, value) in families {
            out += &format!("# HELP shoal_{name} {help}.\n# TYPE shoal_{name} counter\n");
            for s in &r.routes {
                let route = s.route.replace(['\\', '"', '\n'], "_");
                out += &format!("shoal_{name}_total{{route=\"{route}\"}} {}\n", value(s));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_follow_outcomes_and_render_as_metrics() {
        let b = RouteBook::default();
        b.record(LOCAL, Outcome::Sent, 0, 0.0);
        b.record("cloud", Outcome::Sent, 12, 30.0);
        b.record("cloud", Outcome::Failed, 0, 0.0);
        b.record("cloud", Outcome::Refused, 0, 0.0);
        b.add_tokens("cloud", 3);
        let r = b.snapshot();
        let cloud = r.routes.iter().find(|s| s.route == "cloud").unwrap();
        assert_eq!(
            (cloud.requests, cloud.failed, cloud.refused, cloud.tokens),
            (2, 1, 1, 15)
        );
        let text = b.metrics_text();
        assert!(
            text.contains("shoal_route_requests_total{route=\"cloud\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("shoal_route_requests_total{route=\"local\"} 1"),
            "{text}"
        );
    }
}
