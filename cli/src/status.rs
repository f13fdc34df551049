//! `shoal status`: the cluster as a node sees it.

use anyhow::Context;
use clap::Args;
use cluster::status::Status;

/// `shoal status` flags.
#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The node's HTTP API (`host:port` or a URL; SHOAL_HOST too).
    #[arg(long, env = "SHOAL_HOST", default_value = crate::common::DEFAULT_NODE, value_parser = crate::common::node_url)]
    node: String,
    /// Print the JSON the node returns.
    #[arg(long)]
    json: bool,
}

pub fn main(args: StatusArgs) -> anyhow::Result<()> {
    let url = format!("{}/api/status", args.node.trim_end_matches('/'));
    let resp = crate::ask::agent()
        .get(&url)
        .call()
        .with_context(|| format!("cannot reach the node at {}", args.node))?;
    if !resp.status().is_success() {
        return Err(crate::ask::error_of(resp));
    }
    let text = resp.into_body().read_to_string()?;
    let status: Status = serde_json::from_str(&text).context("bad status from the node")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(());
    }
    print!("{}", render(&status));
    Ok(())
}

fn short(id: &str) -> &str {
    &id[id.len().saturating_sub(6)..]
}

fn render(s: &Status) -> String {
    let mut out = String::new();
    let m = &s.model;
    out += &format!(
        "cluster '{}' · {} node(s) · leader {}\nmodel {} ({}, {} layers, {} MiB, blake3 {})\n",
        s.cluster,
        s.nodes.len(),
        short(&s.leader),
        m.name.as_deref().unwrap_or("?"),
        m.architecture,
        m.layers,
        m.bytes >> 20,
        &m.hash[..12.min(m.hash.len())]
    );
    match (&s.plan, &s.plan_error) {
        (Some(p), _) => {
            out += &format!(
                "plan epoch {}: {} | {:.1} ms/token, {:.1} tok/s full\n",
                p.epoch, p.summary, p.token_latency_ms, p.throughput_tokens_per_s
            )
        }
        (None, Some(e)) => out += &format!("no plan: {e}\n"),
        (None, None) => out += "no plan yet\n",
    }
    out += &format!("cluster: {:.1} tok/s\n", s.cluster_tokens_per_s);
    let c = &s.churn;
    out += &format!(
        "seen here: {} joined, {} left, {} lost, {} left out for lying · requests replayed {}, failed {}\n",
        c.joined, c.left, c.lost, c.excluded, c.replays, c.failed
    );
    let w = &s.weights;
    if !w.complete {
        out += &format!(
            "weights from peers: {} of {} MiB here{}\n",
            w.have_bytes >> 20,
            w.total_bytes >> 20,
            w.fetching
                .as_ref()
                .map_or(String::new(), |f| format!(", fetching {f}"))
        );
    }
    let r = &s.routing;
    if !r.upstreams.is_empty() || r.routes.iter().any(|x| x.route != "local") {
        let ups: Vec<String> = r
            .upstreams
            .iter()
            .map(|u| format!("{} ({})", u.name, u.url))
            .collect();
        out += &format!("upstreams: {}\n", ups.join(", "));
    }
    out += &format!("routing: {}\n", r.policy.join("; "));
    for x in &r.routes {
        out += &format!(
            "  route {}: {} requests, {} failed, {} kept in, {} tokens\n",
            x.route, x.requests, x.failed, x.refused, x.tokens
        );
    }
    out += &format!(
        "{:<8} {:<14} {:<12} {:>7} {:>10} {:>9} {:>9} {:>9} {:>8} {:>7} {:>5}  {}\n",
        "NODE",
        "NAME",
        "DEVICE",
        "THREADS",
        "MEMORY",
        "RSS",
        "KV",
        "LAYERS",
        "RTT",
        "TOK/S",
        "BUSY",
        "ADDRESS"
    );
    for n in &s.nodes {
        let layers = n
            .layers
            .map_or("-".to_string(), |[a, b]| format!("{a}..{b}"));
        let rtt = n
            .link_rtt_ms
            .or(n.rtt_ms)
            .map_or("-".to_string(), |r| format!("{r:.2}ms"));
        let id = format!("{}{}", short(&n.id), if n.leader { "*" } else { "" });
        let (rate, busy) = n.load.map_or(("-".to_string(), "-".to_string()), |l| {
            (
                format!("{:.1}", l.tokens_per_s),
                format!("{:.0}%", l.busy * 100.0),
            )
        });
        let (rss, kv) = n.load.map_or(("-".to_string(), "-".to_string()), |l| {
            (
                format!("{} MiB", l.rss_bytes >> 20),
                format!("{:.1} MiB", l.kv_bytes as f64 / (1 << 20) as f64),
            )
        });
        out += &format!(
            "{:<8} {:<14} {:<12} {:>7} {:>6} MiB {:>9} {:>9} {:>9} {:>8} {:>7} {:>5}  {}{}\n",
            id,
            n.name.chars().take(14).collect::<String>(),
            if n.kernels.is_empty() {
                n.device.clone()
            } else {
                format!("{}/{}", n.device, n.kernels)
            },
            n.threads,
            n.memory_bytes >> 20,
            rss,
            kv,
            layers,
            rtt,
            rate,
            busy,
            n.addrs.first().map_or("-", String::as_str),
            if n.same_model { "" } else { "  (other model)" }
        );
    }
    out
}
