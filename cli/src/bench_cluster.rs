//! `shoal bench --cluster URL`: load a running cluster with 1, 2, 4…
//! concurrent streams, measure what its clients see, and put beside each
//! measurement what the simulator predicts for the same cluster (the nodes'
//! own calibrated speeds, the split in force, the probed links) and the
//! same load. This is how the simulator is checked against real runs.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use cluster::AskEvent;
use serde::Serialize;
use sharding::{GgufFile, LinkSpec, ModelLayout, ModelSpec, NodeSpec, PlanGoal};
use simulations::{simulate, Cluster, Link, Load, RequestLog, Summary};

/// A raw prompt that a small model continues for as long as it is let
/// (counting), so every request generates exactly `-n` tokens.
const PROMPT: &str = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20,";

/// Settings of one cluster benchmark.
pub struct ClusterBench<'a> {
    pub url: &'a str,
    pub model: &'a Path,
    pub streams: &'a [usize],
    pub requests_per_stream: usize,
    pub tokens: usize,
    pub json: bool,
    /// Every node runs on this machine: they share its cores.
    pub same_machine: bool,
    /// One-way link latency to simulate, ms (default: the nodes' probes).
    pub link_latency_ms: Option<f64>,
    /// Link bandwidth to simulate, Mbit/s (default: the nodes' probes).
    pub link_mbit: Option<f64>,
    /// Fit one factor on the nodes' compute speeds to the 1-stream level.
    pub fit: bool,
}

/// One concurrency level, measured and predicted.
#[derive(Serialize)]
struct Level {
    streams: usize,
    measured: Summary,
    predicted: Summary,
    plan: String,
    throughput_error: f64,
    token_latency_error: f64,
}

pub fn run(b: &ClusterBench<'_>) -> anyhow::Result<()> {
    anyhow::ensure!(
        !b.streams.is_empty() && b.streams.iter().all(|&s| (1..=64).contains(&s)),
        "--streams: 1 to 64 each"
    );
    anyhow::ensure!((1..=4096).contains(&b.tokens), "-n: 1 to 4096 tokens");
    let url = b.url.trim_end_matches('/');
    let status = get_status(url)?;
    // Warm-up: the origin loads its tokenizer on the first request.
    one_request(url, b.tokens.min(8), Instant::now())?;
    let mut cluster = cluster_of(&status, b.model, b.same_machine)?;
    for row in &mut cluster.links {
        for l in row.iter_mut() {
            if let Some(ms) = b.link_latency_ms {
                l.spec.latency_us = ms * 1e3;
            }
            if let Some(m) = b.link_mbit {
                l.spec.bytes_per_second = m * 1e6 / 8.0;
            }
        }
    }
    let mut levels = Vec::new();
    let mut fitted = false;
    for &streams in b.streams {
        let measured = measure(url, streams, b.requests_per_stream, b.tokens)?;
        let prompt = measured.iter().map(|r| r.prompt).max().unwrap_or(1);
        let load = Load {
            streams: Some(streams),
            rate_per_s: None,
            requests: streams * b.requests_per_stream,
            prompt_tokens: prompt,
            prompt_tokens_max: None,
            output_tokens: b.tokens,
            seed: 1,
            acceptance: None,
        };
        let mut sim = simulate(&cluster, &load)?;
        let m = Summary::of(&measured);
        if streams == 1 && !fitted && b.fit {
            // The nodes calibrated at start, maybe while the machine was
            // busier or quieter than now: one factor on their compute, so
            // that one stream's per-token time matches, and every other
            // level is predicted with it.
            let links = sim.planned_token_ms - sim.planned_compute_ms;
            let f = ((m.token_ms.mean - links) / sim.planned_compute_ms.max(1e-9)).clamp(0.25, 4.0);
            for n in &mut cluster.nodes {
                n.us_per_mib *= f;
                n.row_us_per_mib *= f;
                n.prompt_row_us_per_mib *= f;
            }
            fitted = true;
            if !b.json {
                println!("compute speeds ×{f:.2} to match one stream (the start-up calibration against now)");
            }
            sim = simulate(&cluster, &load)?;
        }
        let p = sim.summary;
        let err = |pred: f64, meas: f64| (pred - meas) / meas.max(1e-9);
        let level = Level {
            streams,
            throughput_error: err(p.throughput_tok_s, m.throughput_tok_s),
            token_latency_error: err(p.token_ms.mean, m.token_ms.mean),
            measured: m,
            predicted: p,
            plan: sim.plan.clone(),
        };
        if !b.json {
            if levels.is_empty() {
                println!("plan: {}", level.plan);
                println!(
                    "{:>7} | {:>21} | {:>23} | {:>17}",
                    "streams",
                    "tok/s meas/pred (err)",
                    "ms/token meas/pred (err)",
                    "TTFT ms meas/pred"
                );
            }
            println!(
                "{:>7} | {:>6.1} {:>6.1} ({:>+4.0}%) | {:>6.1} {:>6.1} ({:>+5.0}%) | {:>7.0} {:>7.0}",
                streams,
                level.measured.throughput_tok_s,
                level.predicted.throughput_tok_s,
                level.throughput_error * 100.0,
                level.measured.token_ms.mean,
                level.predicted.token_ms.mean,
                level.token_latency_error * 100.0,
                level.measured.ttft_ms.mean,
                level.predicted.ttft_ms.mean,
            );
        }
        levels.push(level);
    }
    if b.json {
        println!("{}", serde_json::to_string_pretty(&levels)?);
    }
    Ok(())
}

fn get_status(url: &str) -> anyhow::Result<serde_json::Value> {
    let resp = crate::ask::agent()
        .get(&format!("{url}/api/status"))
        .call()
        .with_context(|| format!("cannot reach the node at {url}"))?;
    anyhow::ensure!(
        resp.status().is_success(),
        "{url}/api/status: {}",
        resp.status()
    );
    Ok(serde_json::from_str(&resp.into_body().read_to_string()?)?)
}

/// The simulator's view of the cluster behind `status`.
fn cluster_of(
    status: &serde_json::Value,
    model: &Path,
    shared_host: bool,
) -> anyhow::Result<Cluster> {
    let gguf = GgufFile::open(model)?;
    let layout = ModelLayout::from_gguf(&gguf)?;
    let m = &status["model"];
    let context = m["context"].as_u64().context("status: model.context")?;
    let mut spec = ModelSpec::from_layout(&layout, context, 2);
    if let Some(a) = m["activation_bytes"].as_u64() {
        spec.activation_bytes = a;
    }
    spec.last_compute_bytes = m["head_compute_bytes"]
        .as_u64()
        .context("status: model.head_compute_bytes")?;
    let nodes_json = status["nodes"].as_array().context("status: nodes")?;
    let f = |v: &serde_json::Value, k: &str| {
        v[k].as_f64()
            .with_context(|| format!("status: nodes[].{k}"))
    };
    let mut nodes = Vec::new();
    let mut split = Vec::new();
    let mut rtts = Vec::new();
    let mut bw = Vec::new();
    let mut threads = Vec::new();
    for (i, n) in nodes_json.iter().enumerate() {
        threads.push(n["threads"].as_f64().unwrap_or(1.0));
        nodes.push(NodeSpec {
            id: n["id"].as_str().context("status: nodes[].id")?.to_string(),
            us_per_mib: f(n, "us_per_mib")?,
            row_us_per_mib: f(n, "row_us_per_mib")?,
            prompt_row_us_per_mib: f(n, "prompt_row_us_per_mib")?,
            memory_bytes: n["memory_bytes"].as_u64().unwrap_or(u64::MAX),
        });
        if let Some(l) = n["layers"].as_array() {
            let (a, b) = (
                l[0].as_u64().unwrap_or(0) as usize,
                l[1].as_u64().unwrap_or(0) as usize,
            );
            split.push((i, a..b));
        }
        rtts.extend(n["link_rtt_ms"].as_f64());
        bw.extend(n["link_mbit_s"].as_f64().filter(|x| *x > 0.0));
    }
    anyhow::ensure!(!split.is_empty(), "the cluster has no plan in force");
    split.sort_by_key(|(_, l)| l.start);
    // Probes measure the answering node's links; the others are taken as alike.
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied()
    };
    let link = Link {
        spec: LinkSpec {
            latency_us: median(&mut rtts).map_or(LinkSpec::LOCAL.latency_us, |r| r * 1e3 / 2.0),
            bytes_per_second: median(&mut bw)
                .map_or(LinkSpec::LOCAL.bytes_per_second, |m| m * 1e6 / 8.0),
        },
        jitter_us: 0.0,
    };
    let n = nodes.len();
    Ok(Cluster {
        model: spec,
        nodes,
        links: vec![vec![link; n]; n],
        goal: PlanGoal::Latency,
        split: Some(split),
        entry: Some(0),
        // Nodes on one machine share its cores (loopback and namespace
        // benchmarks run every node here).
        hosts: if shared_host {
            vec![simulations::Host {
                cores: std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64),
                nodes: threads.into_iter().enumerate().collect(),
            }]
        } else {
            Vec::new()
        },
    })
}

/// `streams` clients, each sending `per_stream` requests one after another.
fn measure(
    url: &str,
    streams: usize,
    per_stream: usize,
    tokens: usize,
) -> anyhow::Result<Vec<RequestLog>> {
    let start = Instant::now();
    let logs = std::thread::scope(|s| {
        let handles: Vec<_> = (0..streams)
            .map(|_| {
                s.spawn(move || {
                    (0..per_stream)
                        .map(|_| one_request(url, tokens, start))
                        .collect::<anyhow::Result<Vec<RequestLog>>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client thread"))
            .collect::<anyhow::Result<Vec<Vec<RequestLog>>>>()
    })?;
    Ok(logs.into_iter().flatten().collect())
}

/// One streamed request; token times as its client sees them.
fn one_request(url: &str, tokens: usize, start: Instant) -> anyhow::Result<RequestLog> {
    let body = serde_json::json!({
        "prompt": PROMPT,
        "raw": true,
        "max_tokens": tokens,
        "temperature": 0.0,
    });
    let ns = || start.elapsed().as_nanos() as u64;
    let mut log = RequestLog {
        arrive: ns(),
        ..RequestLog::default()
    };
    let resp = crate::ask::agent()
        .post(&format!("{url}/api/shoal/generate"))
        .send_json(&body)?;
    if !resp.status().is_success() {
        return Err(crate::ask::error_of(resp));
    }
    let mut reader = BufReader::new(resp.into_body().into_reader());
    let mut line = String::new();
    loop {
        line.clear();
        let n = (&mut reader).take(1 << 20).read_line(&mut line)?;
        anyhow::ensure!(n > 0, "the node closed the stream early");
        // The events `shoal ask` reads, typed the same way.
        match serde_json::from_str::<AskEvent>(line.trim_end())? {
            AskEvent::Token { .. } => log.tokens.push(ns()),
            AskEvent::Tail { .. } => {}
            AskEvent::Done { stats } => {
                log.prompt = stats.prompt_tokens;
                return Ok(log);
            }
            AskEvent::Error { error, .. } => anyhow::bail!("the node failed a request: {error}"),
        }
    }
}
