//! The node's HTTP API: `POST /api/shoal/generate` (NDJSON stream of tokens, used
//! by `shoal ask`), `GET /api/status` (the cluster, for `shoal status`),
//! `GET /api/events` (the same, live, as server-sent events) and the status
//! page at `/`; the OpenAI endpoints are in [`super::openai`].
//! Handlers only translate: the work is in [`super::origin`].

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::origin::{AskRequest, Prompt};
use super::Shared;
use crate::chat;
use crate::sampling::SamplingParams;

/// Largest request body: a prompt of up to 1 MiB of text (the tokenizer's
/// own limit) plus its JSON.
pub const BODY_BYTES_MAX: usize = (1 << 20) + 4096;

/// Most tokens one request may ask for.
pub const MAX_TOKENS_MAX: usize = 1 << 20;

/// Serves the API until `stop`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    // Generation needs the API key when one is set; status stays readable.
    let guarded = Router::new()
        .route("/api/shoal/generate", post(generate))
        .merge(super::openai::routes())
        .merge(super::ollama::routes())
        .route_layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            require_key,
        ));
    let app = Router::new()
        .merge(guarded)
        .route("/", get(page))
        .route("/api/status", get(status))
        .route("/api/events", get(events))
        .route("/metrics", get(metrics))
        .merge(super::ollama::info_routes())
        .layer(axum::middleware::from_fn(read_body_in_time))
        .layer(DefaultBodyLimit::max(BODY_BYTES_MAX))
        .with_state(shared);
    accept_loop(listener, app, stop).await;
}

/// Time a client has to send a request's headers: a connection that
/// trickles them (slowloris) is closed instead of holding a slot forever.
pub const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Time a client has to send a request's body once its headers are in: a
/// body trickled a byte at a time gets 408 instead of holding a handler.
pub const BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Reads the whole body (within [`BODY_BYTES_MAX`]) before the handler
/// runs, under [`BODY_READ_TIMEOUT`].
async fn read_body_in_time(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let (parts, body) = req.into_parts();
    let read = axum::body::to_bytes(body, BODY_BYTES_MAX);
    match tokio::time::timeout(BODY_READ_TIMEOUT, read).await {
        Ok(Ok(bytes)) => {
            next.run(axum::extract::Request::from_parts(parts, Body::from(bytes)))
                .await
        }
        Ok(Err(_)) => error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body over {BODY_BYTES_MAX} bytes (or broken off)"),
        ),
        Err(_) => error(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "request body not received within {} s",
                BODY_READ_TIMEOUT.as_secs()
            ),
        ),
    }
}

/// Connections served at once; more wait in the kernel's backlog.
pub const CONNECTIONS_MAX: usize = 512;

/// hyper's HTTP/1 server, one task per connection, with a header timeout
/// and a connection cap (axum's `serve` has neither).
async fn accept_loop(listener: tokio::net::TcpListener, app: Router, stop: CancellationToken) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;
    let slots = Arc::new(tokio::sync::Semaphore::new(CONNECTIONS_MAX));
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("semaphore open"),
            _ = stop.cancelled() => return,
        };
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                // Out of file descriptors and the like: back off a moment.
                Err(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        let service = TowerToHyperService::new(app.clone());
        let stop = stop.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

/// Refuses requests without `Authorization: Bearer <--api-key>` when the
/// node has a key (401, OpenAI's shape).
async fn require_key(
    State(shared): State<Arc<Shared>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(key) = &shared.config.api_key else {
        return next.run(req).await;
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Compared through blake3 so the time taken does not depend on the prefix matched.
    if given.is_some_and(|g| blake3::hash(g.as_bytes()) == blake3::hash(key.as_bytes())) {
        return next.run(req).await;
    }
    let body = serde_json::json!({"error": {
        "message": "missing or wrong API key (Authorization: Bearer ...)",
        "type": "invalid_request_error", "param": null, "code": "invalid_api_key"}});
    (StatusCode::UNAUTHORIZED, Json(body)).into_response()
}

/// The body of `POST /api/shoal/generate` (shoal's own, used by `shoal ask`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateBody {
    /// Prompt text.
    pub prompt: String,
    /// Skip the chat template.
    #[serde(default)]
    pub raw: bool,
    /// System message.
    pub system: Option<String>,
    /// Most tokens to generate.
    pub max_tokens: Option<usize>,
    /// Temperature.
    pub temperature: Option<f32>,
    /// Top-k.
    pub top_k: Option<usize>,
    /// Top-p.
    pub top_p: Option<f32>,
    /// Min-p.
    pub min_p: Option<f32>,
    /// Repetition penalty.
    pub repeat_penalty: Option<f32>,
    /// Seed.
    pub seed: Option<u64>,
    /// Context window.
    pub context: Option<usize>,
}

#[derive(Serialize)]
struct ErrorBody {
    error: String,
}

/// Seconds a client refused for a full queue is told to wait.
pub const RETRY_AFTER_SECS: u64 = 1;

/// 429 with `Retry-After`, in OpenAI's error shape (which `shoal ask` reads too).
pub fn too_busy(busy: &super::origin::Busy) -> Response {
    let body = serde_json::json!({"error": {
        "message": format!("this node is busy: {} requests are waiting already; retry shortly", busy.queued),
        "type": "rate_limit_error", "param": null, "code": "queue_full"}});
    (
        StatusCode::TOO_MANY_REQUESTS,
        [(header::RETRY_AFTER, RETRY_AFTER_SECS.to_string())],
        Json(body),
    )
        .into_response()
}

fn error(code: StatusCode, msg: impl Into<String>) -> Response {
    (code, Json(ErrorBody { error: msg.into() })).into_response()
}

async fn generate(
    State(shared): State<Arc<Shared>>,
    body: Result<Json<GenerateBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(b) = match body {
        Ok(b) => b,
        Err(e) => return error(e.status(), e.body_text()),
    };
    let d = SamplingParams::default();
    let sampling = SamplingParams {
        temperature: b.temperature.unwrap_or(d.temperature),
        top_k: b.top_k.unwrap_or(d.top_k),
        top_p: b.top_p.unwrap_or(d.top_p),
        min_p: b.min_p.unwrap_or(d.min_p),
        repeat_penalty: b.repeat_penalty.unwrap_or(d.repeat_penalty),
        repeat_last_n: d.repeat_last_n,
        seed: b.seed.unwrap_or_else(rand::random),
    };
    if let Err(e) = sampling.validate() {
        return error(StatusCode::BAD_REQUEST, e);
    }
    let max_tokens = b.max_tokens.unwrap_or(512);
    if max_tokens > MAX_TOKENS_MAX {
        return error(
            StatusCode::BAD_REQUEST,
            format!("max_tokens {max_tokens} is above {MAX_TOKENS_MAX}"),
        );
    }
    let prompt = if b.raw {
        Prompt::Raw(b.prompt)
    } else {
        let mut msgs: Vec<chat::Message> = b
            .system
            .iter()
            .map(|s| chat::Message::new("system", s))
            .collect();
        msgs.push(chat::Message::new("user", b.prompt));
        Prompt::Chat(msgs)
    };
    let req = AskRequest {
        prompt,
        stop: Vec::new(),
        max_tokens,
        sampling,
        context: b.context,
    };
    let (tx, rx) = mpsc::unbounded_channel();
    if let Err(busy) = shared.submit(req, tx) {
        return too_busy(&busy);
    }
    // One JSON object per line; the stream ends after `done` or `error`.
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        let ev = rx.recv().await?;
        let mut line = serde_json::to_vec(&ev).expect("events serialize");
        line.push(b'\n');
        Some((Ok::<_, std::convert::Infallible>(line), rx))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(stream))
        .expect("valid response")
}

/// The cluster as `GET /api/status` shows it.
#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    /// Cluster name.
    pub cluster: String,
    /// The answering node.
    pub node_id: String,
    /// The leader.
    pub leader: String,
    /// The model.
    pub model: ModelStatus,
    /// The plan in force.
    pub plan: Option<PlanStatus>,
    /// Why there is no plan, if there is none.
    pub plan_error: Option<String>,
    /// Every member, this node first.
    pub nodes: Vec<NodeStatus>,
    /// This node's request counters.
    pub requests: super::origin::NodeStats,
    /// Requests waiting for a running slot on this node.
    pub queued: usize,
    /// Requests holding a KV cache on this node's stage.
    pub sequences: usize,
    /// Tokens/s generated by the whole cluster (sum of the nodes' reports).
    pub cluster_tokens_per_s: f64,
    /// The model file on this node: whole, or fetched from peers so far.
    pub weights: super::weights::WeightsStatus,
}

/// The model in status.
#[derive(Debug, Serialize, Deserialize)]
pub struct ModelStatus {
    /// Its name from the GGUF.
    pub name: Option<String>,
    /// Architecture.
    pub architecture: String,
    /// Layers.
    pub layers: usize,
    /// blake3 manifest hash, hex.
    pub hash: String,
    /// Weight bytes.
    pub bytes: u64,
    /// The head's work per token as layer bytes of the same time (this
    /// node's calibration; the planner's `ModelSpec::last_compute_bytes`).
    pub head_compute_bytes: u64,
    /// Context tokens each stage reserves.
    pub context: u64,
    /// Bytes of one token's activations between stages (`--activations`).
    pub activation_bytes: u64,
}

/// The plan in status.
#[derive(Debug, Serialize, Deserialize)]
pub struct PlanStatus {
    /// Epoch.
    pub epoch: u64,
    /// `abc123[0..15) -> def456[15..30)`.
    pub summary: String,
    /// Predicted ms per token.
    pub token_latency_ms: f64,
    /// Predicted tokens/s with the pipeline full.
    pub throughput_tokens_per_s: f64,
}

/// One node in status.
#[derive(Debug, Serialize, Deserialize)]
pub struct NodeStatus {
    /// Node id (libp2p peer id).
    pub id: String,
    /// libp2p multiaddrs, each dialable with `--peer`.
    pub addrs: Vec<String>,
    /// `cpu`, `cuda` or `metal`.
    pub device: String,
    /// Compute threads.
    pub threads: u32,
    /// Memory it may use, bytes.
    pub memory_bytes: u64,
    /// Measured µs per MiB of weights (one-row pass).
    pub us_per_mib: f32,
    /// Measured µs per MiB each extra row of a small batch adds.
    pub row_us_per_mib: f32,
    /// Measured µs per MiB each row of a long prompt pass adds.
    pub prompt_row_us_per_mib: f32,
    /// Its layers `[start, end)` in the plan.
    pub layers: Option<[u32; 2]>,
    /// Control-plane round trip from the answering node (libp2p ping), ms.
    pub rtt_ms: Option<f64>,
    /// Data-plane link from the answering node as probed: round trip, ms.
    pub link_rtt_ms: Option<f64>,
    /// Data-plane link from the answering node as probed: Mbit/s.
    pub link_mbit_s: Option<f64>,
    /// Its HTTP API.
    pub http: String,
    /// Whether it holds the same model as the answering node.
    pub same_model: bool,
    /// Whether it leads.
    pub leader: bool,
    /// Its last load report (this node: measured here).
    pub load: Option<protocol::LoadReport>,
}

/// The status page, embedded in the binary (works offline, no CDN).
const PAGE: &str = include_str!("page/index.html");

/// Live status streams open at once: each costs a task and a snapshot per
/// second; beyond this many, new ones get 503.
pub const EVENT_STREAMS_MAX: usize = 64;

/// How often a live stream gets a fresh snapshot: membership changes show
/// within this (the page promises 2 s).
const EVENT_PERIOD: std::time::Duration = std::time::Duration::from_secs(1);

/// The page with the current status inlined, so it renders complete on
/// first paint (the live feed takes over from there).
async fn page(State(shared): State<Arc<Shared>>) -> Response {
    let json = serde_json::to_string(&build_status(&shared)).expect("status serializes");
    // Inside a <script>: no "</" may close it early.
    let html = PAGE.replacen("/*STATUS*/null", &json.replace("</", "<\\/"), 1);
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response()
}

/// `GET /api/events`: the status as server-sent events, one per second.
async fn events(State(shared): State<Arc<Shared>>) -> Response {
    static STREAMS: std::sync::OnceLock<Arc<tokio::sync::Semaphore>> = std::sync::OnceLock::new();
    let sem = STREAMS.get_or_init(|| Arc::new(tokio::sync::Semaphore::new(EVENT_STREAMS_MAX)));
    let Ok(permit) = sem.clone().try_acquire_owned() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many live status streams",
        );
    };
    let stream = futures::stream::unfold(
        (shared, permit, true),
        |(shared, permit, first)| async move {
            if !first {
                tokio::time::sleep(EVENT_PERIOD).await;
            }
            let json = serde_json::to_string(&build_status(&shared)).expect("status serializes");
            let chunk = format!("data: {json}\n\n").into_bytes();
            Some((
                Ok::<_, std::convert::Infallible>(chunk),
                (shared, permit, false),
            ))
        },
    );
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .expect("valid response")
}

/// `GET /metrics`: Prometheus/OpenMetrics text.
async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        shared.metrics.render(),
    )
        .into_response()
}

async fn status(State(shared): State<Arc<Shared>>) -> Json<Status> {
    Json(build_status(&shared))
}

/// The status snapshot.
pub fn build_status(shared: &Shared) -> Status {
    let plan = shared.plan.borrow().clone();
    let m = shared.membership.lock().expect("lock");
    let leader = m.leader().to_string();
    let layers_of = |id: &str| {
        plan.as_ref()?
            .stages
            .iter()
            .find(|s| s.node_id == id)
            .map(|s| [s.layers_start, s.layers_end])
    };
    let me = m.me();
    let node = |h: &protocol::Hello,
                rtt: Option<u32>,
                probe: Option<(u32, f64)>,
                load: Option<protocol::LoadReport>| NodeStatus {
        id: h.node_id.clone(),
        addrs: h.capabilities.addrs.clone(),
        device: format!("{:?}", h.capabilities.device).to_lowercase(),
        threads: h.capabilities.threads,
        memory_bytes: h.capabilities.memory_bytes,
        us_per_mib: h.capabilities.us_per_mib,
        row_us_per_mib: h.capabilities.row_us_per_mib,
        prompt_row_us_per_mib: h.capabilities.prompt_row_us_per_mib,
        layers: layers_of(&h.node_id),
        rtt_ms: rtt.map(|r| f64::from(r) / 1000.0),
        link_rtt_ms: probe.map(|p| f64::from(p.0) / 1000.0),
        link_mbit_s: probe.map(|p| p.1 * 8.0 / 1e6),
        http: h.capabilities.http_addr.clone(),
        same_model: h.model_hash == me.model_hash,
        leader: h.node_id == leader,
        load,
    };
    let own = *shared.load.lock().expect("load lock");
    let mut nodes = vec![node(me, None, None, Some(own))];
    nodes.extend(
        m.members()
            .values()
            .map(|mem| node(&mem.hello, mem.rtt_us, mem.probe, mem.load)),
    );
    let cluster_tokens_per_s = nodes
        .iter()
        .filter_map(|n| n.load)
        .map(|l| f64::from(l.tokens_per_s))
        .sum();
    let cfg = &shared.layout.config;
    Status {
        cluster: shared.config.cluster.clone(),
        node_id: shared.node_id.clone(),
        leader,
        model: ModelStatus {
            name: cfg.name.clone(),
            architecture: cfg.architecture.clone(),
            layers: cfg.n_layers,
            hash: shared
                .manifest
                .model_hash
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
            bytes: shared.layout.stage_bytes(0..cfg.n_layers),
            head_compute_bytes: m.model().last_compute_bytes,
            context: m.model().context_tokens,
            activation_bytes: m.model().activation_bytes,
        },
        plan: plan.as_ref().map(|p| PlanStatus {
            epoch: p.epoch,
            summary: super::plan_line(p),
            token_latency_ms: p.token_latency_us / 1000.0,
            throughput_tokens_per_s: p.throughput_tokens_per_s,
        }),
        plan_error: m.plan_error().map(str::to_string),
        nodes,
        requests: shared.stats.lock().expect("lock").clone(),
        queued: shared.queued.load(std::sync::atomic::Ordering::Relaxed),
        sequences: shared
            .live_sequences
            .load(std::sync::atomic::Ordering::Relaxed),
        cluster_tokens_per_s,
        weights: shared.weights.status(),
    }
}
