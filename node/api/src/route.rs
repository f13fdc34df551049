//! Hybrid routing: which requests may leave the office for an upstream
//! OpenAI-compatible service, and sending them there.
//!
//! By default nothing leaves. A policy names the cases that may spill
//! (`--spill`): the cluster has no plan, the queue is full, the prompt is
//! longer than the local context, or the request names an upstream's model
//! (`NAME/model`). A request marked private (`X-Shoal-Private: true`, or
//! sent with the private API key) never leaves, whatever the policy: it is
//! refused instead. The decision is pure ([`Routing::decide`]); the
//! upstream's answer — whole or streamed — passes through unchanged in
//! shape, and its failures become clean errors. Upstream keys come from
//! files or the environment and are never logged or shown.

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;
use cluster::routes::{Outcome, UpstreamInfo};
use serde_json::Value;

use crate::errors::ApiError;

/// Longest wait for an upstream's connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest silence from an upstream before its answer is given up.
const READ_TIMEOUT: Duration = Duration::from_secs(120);

/// The header that keeps a request in the office.
pub const PRIVATE_HEADER: &str = "x-shoal-private";

/// An OpenAI-compatible service requests may be sent to.
#[derive(Clone)]
pub struct Upstream {
    /// Its name: its models are `NAME/model` here.
    pub name: String,
    /// Its base URL, up to and including `/v1`.
    pub base: String,
    /// Its API key (from a file or the environment).
    pub key: Option<String>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key is never shown, not even in debug output.
        f.debug_struct("Upstream")
            .field("name", &self.name)
            .field("base", &self.base)
            .field("key", &self.key.as_ref().map(|_| "…"))
            .finish()
    }
}

/// When a request may go upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Spill {
    /// The cluster has no plan (not formed, or too few nodes left).
    NoPlan,
    /// This node's queue is full.
    QueueFull,
    /// The prompt does not fit the local context.
    TooLong,
    /// The request names an upstream's model.
    Named,
}

impl std::str::FromStr for Spill {
    type Err = String;
    fn from_str(s: &str) -> Result<Spill, String> {
        Ok(match s {
            "no-plan" => Spill::NoPlan,
            "queue-full" => Spill::QueueFull,
            "too-long" => Spill::TooLong,
            "named" => Spill::Named,
            _ => {
                return Err(format!(
                    "unknown spill rule '{s}' (no-plan, queue-full, too-long, named)"
                ))
            }
        })
    }
}

impl Spill {
    fn words(self) -> &'static str {
        match self {
            Spill::NoPlan => "when the cluster has no plan",
            Spill::QueueFull => "when this node's queue is full",
            Spill::TooLong => "when the prompt exceeds the local context",
            Spill::Named => "when the request names an upstream model (NAME/model)",
        }
    }
}

/// What keeps a request from being answered here right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Local {
    /// Nothing: the cluster answers.
    Ready,
    /// No plan.
    NoPlan,
    /// The queue is full.
    QueueFull,
    /// The prompt is longer than the context.
    TooLong,
}

/// Where a request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The cluster (with its own error, if it has one).
    Local,
    /// Upstream `index`.
    Upstream(usize),
    /// Nowhere: the policy keeps it in and the cluster cannot answer.
    Refuse(String),
}

/// The upstreams and the policy.
#[derive(Debug, Clone, Default)]
pub struct Routing {
    /// The upstreams; spills go to the first.
    pub upstreams: Vec<Upstream>,
    /// When requests may spill (empty: never).
    pub spill: Vec<Spill>,
    /// The model asked of the upstream on a spill (default: the model the
    /// request named).
    pub spill_model: Option<String>,
    /// HTTP client for upstreams (built when upstreams are configured).
    client: Option<reqwest::Client>,
}

impl Routing {
    /// The routing for these upstreams and rules.
    pub fn new(
        upstreams: Vec<Upstream>,
        spill: Vec<Spill>,
        spill_model: Option<String>,
    ) -> Result<Routing, String> {
        let client = if upstreams.is_empty() {
            None
        } else {
            // reqwest's rustls has no provider of its own here: ring, the
            // one quinn uses, for the whole process.
            cluster::tls::install_provider();
            Some(
                reqwest::Client::builder()
                    .connect_timeout(CONNECT_TIMEOUT)
                    .read_timeout(READ_TIMEOUT)
                    .build()
                    .map_err(|e| format!("upstream HTTP client: {e}"))?,
            )
        };
        Ok(Routing {
            upstreams,
            spill,
            spill_model,
            client,
        })
    }

    /// The policy in words (shown on the page and by `shoal status`).
    pub fn policy(&self) -> Vec<String> {
        let to = self.upstreams.first().map_or("", |u| u.name.as_str());
        let mut lines: Vec<String> = self
            .spill
            .iter()
            .filter(|_| !self.upstreams.is_empty())
            .map(|s| match s {
                Spill::Named => format!("to the upstream named {}", s.words()),
                _ => format!("to {to} {}", s.words()),
            })
            .collect();
        if lines.is_empty() {
            lines.push("nothing leaves this cluster".into());
        } else {
            lines.push("never requests marked private".into());
        }
        lines
    }

    /// The upstreams as shown.
    pub fn shown(&self) -> Vec<UpstreamInfo> {
        self.upstreams
            .iter()
            .map(|u| UpstreamInfo {
                name: u.name.clone(),
                url: u.base.clone(),
            })
            .collect()
    }

    /// The upstream a model name points at (`NAME/model`), and the model.
    pub fn named<'a>(&self, model: &'a str) -> Option<(usize, &'a str)> {
        let (name, rest) = model.split_once('/')?;
        let i = self.upstreams.iter().position(|u| u.name == name)?;
        Some((i, rest))
    }

    /// Where a request goes: `named` is the upstream its model names,
    /// `local` what keeps the cluster from answering now.
    pub fn decide(&self, named: Option<usize>, private: bool, local: Local) -> Decision {
        if let Some(i) = named {
            return if private {
                Decision::Refuse("a private request may not be sent upstream".into())
            } else if self.spill.contains(&Spill::Named) {
                Decision::Upstream(i)
            } else {
                Decision::Refuse(
                    "the routing policy keeps requests in this cluster (no 'named' rule)".into(),
                )
            };
        }
        let rule = match local {
            Local::Ready => return Decision::Local,
            Local::NoPlan => Spill::NoPlan,
            Local::QueueFull => Spill::QueueFull,
            Local::TooLong => Spill::TooLong,
        };
        if self.upstreams.is_empty() || !self.spill.contains(&rule) {
            return Decision::Local;
        }
        if private {
            return Decision::Refuse(format!(
                "this cluster cannot answer now ({}) and the request is private",
                rule.words().trim_start_matches("when ")
            ));
        }
        Decision::Upstream(0)
    }
}

/// Sends `body` (an OpenAI request, `model` replaced) to upstream `i` at
/// `path` (`chat/completions`, `completions`) and passes its answer
/// through; counts it under the upstream's name.
pub(crate) async fn forward(
    app: crate::AppState,
    i: usize,
    path: &str,
    mut body: Value,
    model: &str,
) -> Result<Response, ApiError> {
    let routing = &app.config.routing;
    let book = app.cluster.routes();
    let up = &routing.upstreams[i];
    let client = routing
        .client
        .as_ref()
        .expect("a client when upstreams exist");
    body["model"] = Value::from(model);
    let url = format!("{}/{path}", up.base.trim_end_matches('/'));
    let mut req = client
        .post(&url)
        .header(header::CONTENT_TYPE, "application/json")
        .body(body.to_string());
    if let Some(k) = &up.key {
        req = req.bearer_auth(k);
    }
    let start = Instant::now();
    let fail = |status: StatusCode, message: String| {
        book.record(&up.name, Outcome::Failed, 0, 0.0);
        tracing::warn!(upstream = %up.name, "{message}");
        ApiError {
            status,
            message,
            kind: "upstream_error",
            param: None,
            code: None,
        }
    };
    let resp = match req.send().await {
        Ok(r) => r,
        Err(e) if e.is_timeout() => {
            return Err(fail(
                StatusCode::GATEWAY_TIMEOUT,
                format!("upstream '{}' did not answer in time", up.name),
            ))
        }
        Err(e) => {
            return Err(fail(
                StatusCode::BAD_GATEWAY,
                format!("upstream '{}' is unreachable: {}", up.name, without_url(&e)),
            ))
        }
    };
    let status = resp.status();
    if !status.is_success() {
        let text = resp.text().await.unwrap_or_default();
        let why = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| {
                v.pointer("/error/message")
                    .and_then(Value::as_str)
                    .map(String::from)
            })
            .unwrap_or_else(|| text.chars().take(200).collect());
        return Err(fail(
            StatusCode::BAD_GATEWAY,
            format!("upstream '{}' answered {status}: {why}", up.name),
        ));
    }
    let first_byte_ms = start.elapsed().as_secs_f64() * 1e3;
    let kind = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .cloned()
        .unwrap_or(header::HeaderValue::from_static("application/json"));
    let streamed = kind
        .to_str()
        .is_ok_and(|k| k.starts_with("text/event-stream"));
    if !streamed {
        let bytes = resp.bytes().await.map_err(|e| {
            fail(
                StatusCode::BAD_GATEWAY,
                format!("upstream '{}' broke off: {}", up.name, without_url(&e)),
            )
        })?;
        book.record(&up.name, Outcome::Sent, usage_tokens(&bytes), first_byte_ms);
        return Ok(Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, kind)
            .body(Body::from(bytes))
            .expect("valid response"));
    }
    book.record(&up.name, Outcome::Sent, 0, first_byte_ms);
    // Streamed on as it comes; a usage chunk's tokens are counted at
    // the end.
    let name = up.name.clone();
    let usage = UsageCounter::default();
    let counter = usage.clone();
    let stream = futures::StreamExt::map(resp.bytes_stream(), move |chunk| {
        if let Ok(b) = &chunk {
            counter.feed(b);
        }
        chunk.map_err(std::io::Error::other)
    });
    let app = app.clone();
    let end = futures::stream::once(async move {
        app.cluster.routes().add_tokens(&name, usage.total());
        Ok(Vec::new())
    });
    let stream = futures::StreamExt::chain(
        futures::StreamExt::map(stream, |c| c.map(|b| b.to_vec())),
        end,
    );
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, kind)
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .expect("valid response"))
}

/// The models of every upstream, named `NAME/model` (an upstream that does
/// not answer within 5 s is left out, with a warning).
pub(crate) async fn upstream_models(app: &crate::AppState) -> Vec<Value> {
    let routing = &app.config.routing;
    let Some(client) = &routing.client else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for up in &routing.upstreams {
        let mut req = client
            .get(format!("{}/models", up.base.trim_end_matches('/')))
            .timeout(Duration::from_secs(5));
        if let Some(k) = &up.key {
            req = req.bearer_auth(k);
        }
        let listed = match req.send().await {
            Ok(r) if r.status().is_success() => r
                .bytes()
                .await
                .ok()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok()),
            _ => None,
        };
        let Some(list) = listed else {
            tracing::warn!(upstream = %up.name, "its model list did not come");
            continue;
        };
        for m in list["data"].as_array().into_iter().flatten().take(1000) {
            if let Some(id) = m["id"].as_str() {
                let mut m = m.clone();
                m["id"] = Value::from(format!("{}/{id}", up.name));
                m["owned_by"] = Value::from(up.name.clone());
                out.push(m);
            }
        }
    }
    out
}

/// A reqwest error without its URL (which could carry credentials).
fn without_url(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    if let Some(u) = e.url() {
        s = s.replace(u.as_str(), "(upstream)");
    }
    s
}

/// `usage.completion_tokens` of a whole OpenAI answer (0 if absent).
fn usage_tokens(body: &[u8]) -> u64 {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| {
            v.pointer("/usage/completion_tokens")
                .and_then(Value::as_u64)
        })
        .unwrap_or(0)
}

/// Whether a request is marked private (the header, which the private API
/// key sets too).
pub fn is_private(headers: &HeaderMap) -> bool {
    headers
        .get(PRIVATE_HEADER)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes"))
}

/// Completion tokens in a streamed answer's usage chunk, read as the
/// bytes pass (lines may be split across chunks).
#[derive(Clone, Default)]
struct UsageCounter(std::sync::Arc<std::sync::Mutex<(String, u64)>>);

impl UsageCounter {
    fn feed(&self, bytes: &[u8]) {
        let mut g = self.0.lock().expect("usage counter");
        g.0.push_str(&String::from_utf8_lossy(bytes));
        while let Some(i) = g.0.find('\n') {
            let line: String = g.0.drain(..=i).collect();
            if let Some(data) = line.trim().strip_prefix("data: ") {
                g.1 += usage_tokens(data.as_bytes());
            }
        }
        // A line longer than any real chunk is not kept growing.
        if g.0.len() > 1 << 20 {
            g.0.clear();
        }
    }

    fn total(&self) -> u64 {
        self.0.lock().expect("usage counter").1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routing(spill: &[Spill]) -> Routing {
        let up = Upstream {
            name: "cloud".into(),
            base: "http://127.0.0.1:9/v1".into(),
            key: Some("sk-secret".into()),
        };
        Routing::new(vec![up], spill.to_vec(), None).unwrap()
    }

    #[test]
    fn nothing_leaves_without_a_rule_and_private_never_does() {
        let none = routing(&[]);
        for local in [
            Local::Ready,
            Local::NoPlan,
            Local::QueueFull,
            Local::TooLong,
        ] {
            assert_eq!(none.decide(None, false, local), Decision::Local);
        }
        assert!(matches!(
            none.decide(Some(0), false, Local::Ready),
            Decision::Refuse(_)
        ));
        assert_eq!(
            none.policy(),
            vec!["nothing leaves this cluster".to_string()]
        );
        let all = routing(&[
            Spill::NoPlan,
            Spill::QueueFull,
            Spill::TooLong,
            Spill::Named,
        ]);
        assert_eq!(all.decide(None, false, Local::Ready), Decision::Local);
        assert_eq!(
            all.decide(None, false, Local::NoPlan),
            Decision::Upstream(0)
        );
        assert_eq!(
            all.decide(None, false, Local::TooLong),
            Decision::Upstream(0)
        );
        assert_eq!(
            all.decide(Some(0), false, Local::Ready),
            Decision::Upstream(0)
        );
        for local in [Local::NoPlan, Local::QueueFull, Local::TooLong] {
            assert!(matches!(all.decide(None, true, local), Decision::Refuse(_)));
        }
        assert!(matches!(
            all.decide(Some(0), true, Local::Ready),
            Decision::Refuse(_)
        ));
        let only_plan = routing(&[Spill::NoPlan]);
        assert_eq!(
            only_plan.decide(None, false, Local::QueueFull),
            Decision::Local
        );
    }

    #[test]
    fn names_keys_and_headers() {
        let r = routing(&[Spill::Named]);
        assert_eq!(r.named("cloud/gpt-4o-mini"), Some((0, "gpt-4o-mini")));
        assert_eq!(r.named("other/x"), None);
        assert_eq!(r.named("smollm2:135m"), None);
        assert!(!format!("{:?}", r.upstreams[0]).contains("secret"));
        let mut h = HeaderMap::new();
        assert!(!is_private(&h));
        h.insert(PRIVATE_HEADER, "True".parse().unwrap());
        assert!(is_private(&h));
        assert_eq!("no-plan".parse::<Spill>(), Ok(Spill::NoPlan));
        assert!("always".parse::<Spill>().is_err());
    }

    #[test]
    fn stream_usage_is_counted_across_split_chunks() {
        let c = UsageCounter::default();
        c.feed(b"data: {\"choices\":[]}\n\ndata: {\"usage\":{\"completion");
        c.feed(b"_tokens\":7}}\n\ndata: [DONE]\n\n");
        assert_eq!(c.total(), 7);
    }
}
