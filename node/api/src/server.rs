//! The HTTP/1 server under the API: hyper's connection loop with a cap on
//! connections, deadlines for headers and bodies, a body size limit, and
//! the API-key check.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use tokio_util::sync::CancellationToken;

use crate::errors::error;
use crate::AppState;

/// Largest request body: a prompt of up to 1 MiB of text (the tokenizer's
/// own limit) plus its JSON.
pub const BODY_BYTES_MAX: usize = (1 << 20) + 4096;

/// Time a client has to send a request's headers: a connection that
/// trickles them (slowloris) is closed instead of holding a slot forever.
pub const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Time a client has to send a request's body once its headers are in: a
/// body trickled a byte at a time gets 408 instead of holding a handler.
pub const BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Reads the whole body (within [`BODY_BYTES_MAX`]) before the handler
/// runs, under [`BODY_READ_TIMEOUT`].
pub(crate) async fn read_body_in_time(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
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
pub(crate) async fn accept_loop(
    listener: tokio::net::TcpListener,
    app: Router,
    stop: CancellationToken,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;
    let slots = Arc::new(tokio::sync::Semaphore::new(CONNECTIONS_MAX));
    let per_client = Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("semaphore open"),
            _ = stop.cancelled() => return,
        };
        let (stream, peer) = tokio::select! {
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
        // One client (one address) may not hold every slot.
        let Some(client) = ClientSlot::take(&per_client, peer.ip()) else {
            drop(stream);
            continue;
        };
        let service = TowerToHyperService::new(app.clone());
        let stop = stop.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _client = client;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            let stream = WriteDeadline::new(stream, WRITE_TIMEOUT);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

/// Connections one client address may hold at once: a browser opens six,
/// a busy script a few dozen; one host cannot take every slot.
pub const CONNECTIONS_PER_CLIENT_MAX: usize = 64;

/// Longest one write to a client may wait: a client that stops reading a
/// stream loses its connection instead of holding a handler and its slot.
pub const WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

type PerClient = Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>;

/// One connection counted against its client's cap while held.
struct ClientSlot {
    table: PerClient,
    ip: std::net::IpAddr,
}

impl ClientSlot {
    fn take(table: &PerClient, ip: std::net::IpAddr) -> Option<ClientSlot> {
        let mut t = table.lock().expect("lock");
        let n = t.entry(ip).or_insert(0);
        if *n >= CONNECTIONS_PER_CLIENT_MAX {
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            table: table.clone(),
            ip,
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut t = self.table.lock().expect("lock");
        if let Some(n) = t.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                t.remove(&self.ip);
            }
        }
    }
}

/// A stream whose writes fail after waiting `limit` for the peer to read.
struct WriteDeadline<S> {
    inner: S,
    limit: std::time::Duration,
    /// Set while a write is pending.
    deadline: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<S> WriteDeadline<S> {
    fn new(inner: S, limit: std::time::Duration) -> Self {
        WriteDeadline {
            inner,
            limit,
            deadline: None,
        }
    }

    /// Pending writes past the deadline become a `TimedOut` error.
    fn check(
        &mut self,
        cx: &mut std::task::Context<'_>,
        r: std::task::Poll<std::io::Result<usize>>,
    ) -> std::task::Poll<std::io::Result<usize>> {
        use std::task::Poll;
        if r.is_ready() {
            self.deadline = None;
            return r;
        }
        let limit = self.limit;
        let sleep = self
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match std::future::Future::poll(sleep.as_mut(), cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::ErrorKind::TimedOut.into())),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for WriteDeadline<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for WriteDeadline<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        self.check(cx, r)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Refuses requests without `Authorization: Bearer KEY` when the node has
/// a key (401, OpenAI's shape): every route, the status ones too.
pub(crate) async fn require_key(
    State(app): State<AppState>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    // A browser's preflight carries no credentials (a configured origin's
    // is answered before this, by `check_host_origin`).
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Compared through blake3 so the time taken does not depend on the prefix matched.
    let matches = |key: &Option<String>| {
        key.as_ref().is_some_and(|k| {
            given.is_some_and(|g| blake3::hash(g.as_bytes()) == blake3::hash(k.as_bytes()))
        })
    };
    // The private key's requests are marked so no route sends them out.
    if matches(&app.config.private_api_key) {
        req.headers_mut().insert(
            crate::route::PRIVATE_HEADER,
            axum::http::HeaderValue::from_static("true"),
        );
        return next.run(req).await;
    }
    let Some(key) = &app.config.api_key else {
        return next.run(req).await;
    };
    if matches(&Some(key.clone())) {
        return next.run(req).await;
    }
    // The page itself (no data in it) comes with the 401: it asks for the
    // key and sends it with each of its requests.
    if req.uri().path() == "/" && req.method() == axum::http::Method::GET {
        return (
            StatusCode::UNAUTHORIZED,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            crate::status::page_html(None, true),
        )
            .into_response();
    }
    let body = serde_json::json!({"error": {
        "message": "missing or wrong API key (Authorization: Bearer ...)",
        "type": "invalid_request_error", "param": null, "code": "invalid_api_key"}});
    (StatusCode::UNAUTHORIZED, Json(body)).into_response()
}

/// Whether the API answers a request that names `host` (its `Host`
/// header) — the guard against DNS rebinding, where a web page gets a
/// name of its own to resolve to this node and drives the API from the
/// office's browsers: IP literals and `localhost` (no page can own them),
/// this machine's own names, and the names configured (`--allow-host`).
pub fn host_allowed(host: &str, allowed: &[String]) -> bool {
    let name = match host.strip_prefix('[') {
        // An IPv6 literal, with or without a port.
        Some(rest) => {
            return rest
                .split_once(']')
                .is_some_and(|(ip, _)| ip.parse::<std::net::Ipv6Addr>().is_ok())
        }
        None => match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        },
    };
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    name.parse::<std::net::Ipv4Addr>().is_ok()
        || name == "localhost"
        || name.ends_with(".localhost")
        || allowed.iter().any(|a| a.eq_ignore_ascii_case(&name))
}

/// The names this machine goes by (its hostname, and `.local` for mDNS),
/// allowed as `Host` without configuration.
pub fn own_names() -> Vec<String> {
    let Some(name) = cluster::host_name() else {
        return Vec::new();
    };
    let name = name.to_ascii_lowercase();
    if name.len() > 253 {
        return Vec::new();
    }
    vec![format!("{name}.local"), name]
}

/// `origin` (`scheme://host[:port]`) names the same host and port as the
/// request's `Host`: the page's own requests.
fn same_origin(origin: &str, host: Option<&str>) -> bool {
    let authority = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"));
    matches!((authority, host), (Some(a), Some(h)) if a.eq_ignore_ascii_case(h))
}

/// Refuses (403) a request whose `Host` is not one of this node's names,
/// or that a page of another origin sends (`Origin` not this host), unless
/// that origin was configured (`--cors-origin`): then it gets CORS headers
/// and its preflight an answer.
pub(crate) async fn check_host_origin(
    State(app): State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let host = match req.headers().get(header::HOST).map(|v| v.to_str()) {
        None => None,
        Some(Ok(h)) => Some(h.to_string()),
        Some(Err(_)) => return error(StatusCode::FORBIDDEN, "unreadable Host header"),
    };
    if let Some(h) = &host {
        if !host_allowed(h, &app.config.allowed_hosts) {
            return error(
                StatusCode::FORBIDDEN,
                "this node does not answer for that Host name (DNS rebinding guard); add it with --allow-host",
            );
        }
    }
    let cors = match req.headers().get(header::ORIGIN).map(|v| v.to_str()) {
        None => None,
        Some(Ok(o))
            if app
                .config
                .cors_origins
                .iter()
                .any(|c| c.eq_ignore_ascii_case(o)) =>
        {
            Some(header::HeaderValue::from_str(o).expect("was a header value"))
        }
        Some(Ok(o)) if same_origin(o, host.as_deref()) => None,
        Some(_) => {
            return error(
                StatusCode::FORBIDDEN,
                "cross-origin requests are refused; allow an origin with --cors-origin",
            )
        }
    };
    let Some(origin) = cors else {
        return next.run(req).await;
    };
    let mut resp = if req.method() == axum::http::Method::OPTIONS {
        let mut r = StatusCode::NO_CONTENT.into_response();
        let h = r.headers_mut();
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            header::HeaderValue::from_static("GET, POST"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            header::HeaderValue::from_static("authorization, content-type"),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            header::HeaderValue::from_static("600"),
        );
        r
    } else {
        next.run(req).await
    };
    let h = resp.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    h.insert(header::VARY, header::HeaderValue::from_static("Origin"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ip_literals_localhost_and_named_hosts_pass() {
        let named = vec!["shoal.office.lan".to_string()];
        for ok in [
            "127.0.0.1",
            "127.0.0.1:8080",
            "10.1.2.3:80",
            "[::1]:8080",
            "[fe80::1]",
            "localhost:8080",
            "LOCALHOST",
            "app.localhost",
            "shoal.office.lan",
            "Shoal.Office.Lan.:8080",
        ] {
            assert!(host_allowed(ok, &named), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:8080",
            "127.0.0.1.evil.example",
            "localhost.evil.example",
            "[not-an-ip]",
            "shoal.office.lan.evil",
            "",
        ] {
            assert!(!host_allowed(bad, &named), "{bad}");
        }
    }

    #[test]
    fn same_origin_is_scheme_host_and_port() {
        assert!(same_origin("http://127.0.0.1:8080", Some("127.0.0.1:8080")));
        assert!(!same_origin(
            "http://127.0.0.1:9090",
            Some("127.0.0.1:8080")
        ));
        assert!(!same_origin("null", Some("127.0.0.1:8080")));
        assert!(!same_origin("http://127.0.0.1:8080", None));
    }
}
