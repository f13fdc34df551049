//! Scenario files: a cluster, a model and a load in TOML.
//!
//! ```toml
//! name = "four laptops"
//! [model]
//! shape = "llama-3-70b"      # or gguf = "model.gguf" (its header is read)
//! quant = "q4_k_m"
//! context = 4096
//! [[nodes]]
//! name = "laptop"
//! count = 4
//! memory_gib = 14
//! bandwidth_gb_s = 60        # or measured: us_per_mib, row_us_per_mib, prompt_row_us_per_mib
//! tflops = 1.0
//! [links]
//! latency_ms = 2.0
//! bandwidth_mbit = 400
//! jitter_ms = 1.0
//! [load]
//! streams = 4                # or rate_per_s = 0.2
//! requests = 16
//! prompt_tokens = 256
//! output_tokens = 128
//! ```
//!
//! A node's speed is either measured (what `shoal node` calibrates and
//! `shoal status --json` shows) or derived from its hardware: decoding
//! streams the weights once per pass, so a MiB costs `1/bandwidth`; each
//! row adds two flops per weight at `tflops`.

use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sharding::{GgufFile, LinkSpec, ModelLayout, ModelSpec, NodeSpec, PlanGoal};

use crate::shapes;
use crate::sim::{Cluster, Link, Load};

/// Nodes a scenario may describe (after `count` is expanded).
pub const NODES_MAX: usize = 64;
/// Context tokens a scenario may reserve.
pub const CONTEXT_MAX: u64 = 1 << 20;

/// Why a scenario cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScenarioError {
    /// Not valid TOML or not the schema.
    #[error("scenario: {0}")]
    Parse(#[from] toml::de::Error),
    /// Valid TOML, impossible values.
    #[error("scenario: {0}")]
    Invalid(String),
    /// The GGUF it names cannot be read.
    #[error("scenario: model {path}: {why}")]
    Model {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        why: String,
    },
}

/// A scenario file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Shown in reports.
    #[serde(default)]
    pub name: Option<String>,
    /// Assumptions, in words.
    #[serde(default)]
    pub description: Option<String>,
    /// The model.
    pub model: ModelDef,
    /// The machines.
    pub nodes: Vec<NodeDef>,
    /// The network.
    #[serde(default)]
    pub links: LinksDef,
    /// The requests.
    pub load: LoadDef,
    /// Planner settings.
    #[serde(default)]
    pub plan: PlanDef,
    /// Machines that several nodes share (`host = "…"` on the nodes).
    #[serde(default)]
    pub hosts: Vec<HostDef>,
}

/// `[[hosts]]`: a machine shared by several nodes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostDef {
    /// Its name.
    pub name: String,
    /// Its cores.
    pub cores: f64,
}

/// `[model]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelDef {
    /// A named shape (see [`shapes::SHAPES`]).
    pub shape: Option<String>,
    /// Quant type of a named shape (see [`shapes::QUANTS`]); default q4_k_m.
    pub quant: Option<String>,
    /// A GGUF file (relative to the scenario file).
    pub gguf: Option<PathBuf>,
    /// Context tokens each stage reserves KV cache for.
    #[serde(default = "default_context")]
    pub context: u64,
    /// Bytes per KV cache element: 2 (f16, CPUs) or 4 (f32, shoal's GPUs).
    #[serde(default = "default_kv_bytes")]
    pub kv_bytes: u64,
}

fn default_context() -> u64 {
    4096
}
fn default_kv_bytes() -> u64 {
    2
}

/// `[[nodes]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeDef {
    /// Its name (with `-1`, `-2`… when `count` > 1).
    pub name: String,
    /// Identical machines.
    #[serde(default)]
    pub count: Option<usize>,
    /// Memory for weights and KV cache, GiB.
    pub memory_gib: f64,
    /// Measured µs per MiB of a one-row pass.
    pub us_per_mib: Option<f64>,
    /// Measured µs per MiB per extra row of a small batch.
    pub row_us_per_mib: Option<f64>,
    /// Measured µs per MiB per row of a long prompt.
    pub prompt_row_us_per_mib: Option<f64>,
    /// Memory bandwidth the kernels reach, GB/s (instead of `us_per_mib`).
    pub bandwidth_gb_s: Option<f64>,
    /// Arithmetic the kernels reach, TFLOPS (instead of the row costs).
    pub tflops: Option<f64>,
    /// The `[[hosts]]` machine it shares with other nodes.
    pub host: Option<String>,
    /// Cores its passes keep busy on that machine (default 1).
    pub threads: Option<f64>,
}

/// `[links]`: every pair, unless a `[[links.pairs]]` entry says otherwise.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinksDef {
    /// One-way latency, ms.
    #[serde(default = "default_latency")]
    pub latency_ms: f64,
    /// Mbit/s.
    #[serde(default = "default_bandwidth")]
    pub bandwidth_mbit: f64,
    /// Mean extra delay per message, ms.
    #[serde(default)]
    pub jitter_ms: f64,
    /// Overrides for some pairs (both directions).
    #[serde(default)]
    pub pairs: Vec<PairDef>,
}

impl Default for LinksDef {
    fn default() -> Self {
        LinksDef {
            latency_ms: default_latency(),
            bandwidth_mbit: default_bandwidth(),
            jitter_ms: 0.0,
            pairs: Vec::new(),
        }
    }
}

fn default_latency() -> f64 {
    LinkSpec::LOCAL.latency_us / 1e3
}
fn default_bandwidth() -> f64 {
    LinkSpec::LOCAL.bytes_per_second * 8.0 / 1e6
}

/// `[[links.pairs]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PairDef {
    /// One node's name.
    pub a: String,
    /// The other's.
    pub b: String,
    /// One-way latency, ms.
    pub latency_ms: Option<f64>,
    /// Mbit/s.
    pub bandwidth_mbit: Option<f64>,
    /// Mean extra delay per message, ms.
    pub jitter_ms: Option<f64>,
}

/// `[load]`: see [`Load`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadDef {
    /// Closed-loop clients.
    pub streams: Option<usize>,
    /// Open-loop arrivals per second.
    pub rate_per_s: Option<f64>,
    /// Requests in all (default: 4 per stream, or 32).
    pub requests: Option<usize>,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Prompt lengths uniform up to this.
    pub prompt_tokens_max: Option<usize>,
    /// Generated tokens per request.
    pub output_tokens: usize,
    /// Seed.
    #[serde(default)]
    pub seed: u64,
    /// Speculative decoding's per-token acceptance (0..1); none: off.
    pub speculation_acceptance: Option<f64>,
}

/// `[plan]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanDef {
    /// `latency` (default) or `throughput`.
    pub goal: Option<String>,
    /// A fixed split instead of the planner's.
    pub split: Option<Vec<SplitDef>>,
    /// The node requests arrive at (default: the first stage's).
    pub entry: Option<String>,
}

/// One stage of a fixed split.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitDef {
    /// Node name.
    pub node: String,
    /// `[start, end)`.
    pub layers: [usize; 2],
}

impl Scenario {
    /// Parses a scenario.
    pub fn from_toml(text: &str) -> Result<Scenario, ScenarioError> {
        Ok(toml::from_str(text)?)
    }

    /// Reads and parses a scenario file.
    pub fn load(path: &Path) -> Result<(Scenario, PathBuf), ScenarioError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ScenarioError::Invalid(format!("{}: {e}", path.display())))?;
        let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        Ok((Scenario::from_toml(&text)?, dir))
    }

    /// The model, the cluster and the load; a GGUF path is taken relative to `dir`.
    pub fn resolve(&self, dir: &Path) -> Result<(Cluster, Load), ScenarioError> {
        let (model, bits) = self.model.spec(dir)?;
        let nodes = self.nodes(bits)?;
        let links = self.links(&nodes)?;
        let index = |name: &str| {
            nodes
                .iter()
                .position(|n| n.id == name)
                .ok_or_else(|| invalid(format!("no node named {name:?}")))
        };
        let split = match &self.plan.split {
            Some(stages) => Some(
                stages
                    .iter()
                    .map(|s| Ok((index(&s.node)?, s.layers[0]..s.layers[1])))
                    .collect::<Result<Vec<(usize, Range<usize>)>, ScenarioError>>()?,
            ),
            None => None,
        };
        let entry = self.plan.entry.as_deref().map(index).transpose()?;
        let goal = match self.plan.goal.as_deref() {
            None | Some("latency") => PlanGoal::Latency,
            Some("throughput") => PlanGoal::Throughput,
            Some(g) => return Err(invalid(format!("plan.goal {g:?}: latency or throughput"))),
        };
        let l = &self.load;
        let load = Load {
            streams: l.streams,
            rate_per_s: l.rate_per_s,
            requests: l
                .requests
                .unwrap_or(l.streams.map_or(32, |s| s.saturating_mul(4))),
            prompt_tokens: l.prompt_tokens,
            prompt_tokens_max: l.prompt_tokens_max,
            output_tokens: l.output_tokens,
            seed: l.seed,
            acceptance: l.speculation_acceptance,
        };
        if load.acceptance.is_some_and(|a| !(0.0..1.0).contains(&a)) {
            return Err(invalid("speculation_acceptance must be in [0, 1)".into()));
        }
        let mut hosts: Vec<crate::sim::Host> = Vec::new();
        for h in &self.hosts {
            if !(h.cores > 0.0 && h.cores <= 4096.0) {
                return Err(invalid(format!("host {}: cores must be 0 to 4096", h.name)));
            }
            let mut members = Vec::new();
            let mut i = 0;
            for d in &self.nodes {
                for _ in 0..d.count.unwrap_or(1) {
                    if d.host.as_deref() == Some(h.name.as_str()) {
                        let t = d.threads.unwrap_or(1.0);
                        if !(0.0..=1024.0).contains(&t) {
                            return Err(invalid(format!("{}: threads must be 0 to 1024", d.name)));
                        }
                        members.push((i, t));
                    }
                    i += 1;
                }
            }
            hosts.push(crate::sim::Host {
                cores: h.cores,
                nodes: members,
            });
        }
        if let Some(d) = self.nodes.iter().find(|d| {
            d.host
                .as_ref()
                .is_some_and(|n| !self.hosts.iter().any(|h| &h.name == n))
        }) {
            return Err(invalid(format!(
                "{}: no [[hosts]] named {:?}",
                d.name, d.host
            )));
        }
        let cluster = Cluster {
            model,
            nodes,
            links,
            goal,
            split,
            entry,
            hosts,
        };
        Ok((cluster, load))
    }

    fn nodes(&self, bits: f64) -> Result<Vec<NodeSpec>, ScenarioError> {
        let mut out = Vec::new();
        for d in &self.nodes {
            let count = d.count.unwrap_or(1);
            if count == 0 || out.len() + count > NODES_MAX {
                return Err(invalid(format!(
                    "{}: 1 to {NODES_MAX} nodes in all",
                    d.name
                )));
            }
            if !(d.memory_gib > 0.0 && d.memory_gib < 1e6) {
                return Err(invalid(format!("{}: memory_gib must be positive", d.name)));
            }
            let speed = d.speed(bits)?;
            for i in 0..count {
                let name = if count == 1 {
                    d.name.clone()
                } else {
                    format!("{}-{}", d.name, i + 1)
                };
                if out.iter().any(|n: &NodeSpec| n.id == name) {
                    return Err(invalid(format!("two nodes named {name:?}")));
                }
                out.push(NodeSpec {
                    id: name,
                    memory_bytes: (d.memory_gib * (1u64 << 30) as f64) as u64,
                    ..speed.clone()
                });
            }
        }
        if out.is_empty() {
            return Err(invalid("no nodes".into()));
        }
        Ok(out)
    }

    fn links(&self, nodes: &[NodeSpec]) -> Result<Vec<Vec<Link>>, ScenarioError> {
        let d = &self.links;
        let link = |latency_ms: f64, mbit: f64, jitter_ms: f64| {
            if !(latency_ms >= 0.0 && mbit > 0.0 && jitter_ms >= 0.0) {
                return Err(invalid(
                    "links need latency_ms ≥ 0, bandwidth_mbit > 0, jitter_ms ≥ 0".into(),
                ));
            }
            Ok(Link {
                spec: LinkSpec {
                    latency_us: latency_ms * 1e3,
                    bytes_per_second: mbit * 1e6 / 8.0,
                },
                jitter_us: jitter_ms * 1e3,
            })
        };
        let all = link(d.latency_ms, d.bandwidth_mbit, d.jitter_ms)?;
        let mut links = vec![vec![all; nodes.len()]; nodes.len()];
        for p in &d.pairs {
            let find = |name: &str| {
                nodes
                    .iter()
                    .position(|n| n.id == name)
                    .ok_or_else(|| invalid(format!("links.pairs: no node named {name:?}")))
            };
            let (a, b) = (find(&p.a)?, find(&p.b)?);
            let l = link(
                p.latency_ms.unwrap_or(d.latency_ms),
                p.bandwidth_mbit.unwrap_or(d.bandwidth_mbit),
                p.jitter_ms.unwrap_or(d.jitter_ms),
            )?;
            links[a][b] = l;
            links[b][a] = l;
        }
        Ok(links)
    }
}

impl NodeDef {
    /// Its speeds (memory left for the caller), from measurements or hardware.
    fn speed(&self, bits: f64) -> Result<NodeSpec, ScenarioError> {
        let positive = |x: Option<f64>| x.filter(|v| *v > 0.0 && v.is_finite());
        let us_per_mib = match (positive(self.us_per_mib), positive(self.bandwidth_gb_s)) {
            (Some(us), _) => us,
            (None, Some(bw)) => (1u64 << 20) as f64 / (bw * 1e9) * 1e6,
            (None, None) => {
                return Err(invalid(format!(
                    "{}: give us_per_mib (measured) or bandwidth_gb_s (hardware)",
                    self.name
                )))
            }
        };
        // Two flops per weight per row; a MiB holds 8·2²⁰/bits weights.
        let from_flops = positive(self.tflops)
            .map(|t| 2.0 * 8.0 * (1u64 << 20) as f64 / bits / (t * 1e12) * 1e6);
        let row = positive(self.row_us_per_mib)
            .or(from_flops)
            .unwrap_or(us_per_mib);
        let prompt = positive(self.prompt_row_us_per_mib)
            .or(from_flops)
            .unwrap_or(row);
        Ok(NodeSpec {
            id: self.name.clone(),
            us_per_mib,
            row_us_per_mib: row,
            prompt_row_us_per_mib: prompt,
            memory_bytes: 0,
        })
    }
}

impl ModelDef {
    /// The planner's view and the bits per weight of the layers.
    fn spec(&self, dir: &Path) -> Result<(ModelSpec, f64), ScenarioError> {
        if self.context == 0 || self.context > CONTEXT_MAX {
            return Err(invalid(format!("model.context must be 1 to {CONTEXT_MAX}")));
        }
        if !matches!(self.kv_bytes, 1 | 2 | 4) {
            return Err(invalid("model.kv_bytes must be 1, 2 or 4".into()));
        }
        match (&self.shape, &self.gguf) {
            (Some(name), None) => {
                let shape = shapes::shape(name).ok_or_else(|| {
                    let known: Vec<&str> = shapes::SHAPES.iter().map(|s| s.name).collect();
                    invalid(format!("model.shape {name:?}: one of {}", known.join(", ")))
                })?;
                let quant = self.quant.as_deref().unwrap_or("q4_k_m");
                let bits = shapes::bits_per_weight(quant).ok_or_else(|| {
                    let known: Vec<&str> = shapes::QUANTS.iter().map(|q| q.0).collect();
                    invalid(format!(
                        "model.quant {quant:?}: one of {}",
                        known.join(", ")
                    ))
                })?;
                Ok((shape.spec(bits, self.context, self.kv_bytes), bits))
            }
            (None, Some(path)) => {
                let path = dir.join(path);
                let bad = |why: String| ScenarioError::Model {
                    path: path.clone(),
                    why,
                };
                let gguf = GgufFile::open(&path).map_err(|e| bad(e.to_string()))?;
                let layout = ModelLayout::from_gguf(&gguf).map_err(|e| bad(e.to_string()))?;
                let (bytes, elements) = layout
                    .layers
                    .iter()
                    .flat_map(|l| &l.tensors)
                    .fold((0u64, 0u64), |(b, e), t| {
                        (b + t.size_bytes, e + t.elements())
                    });
                let bits = bytes as f64 * 8.0 / elements.max(1) as f64;
                Ok((
                    ModelSpec::from_layout(&layout, self.context, self.kv_bytes),
                    bits,
                ))
            }
            _ => Err(invalid(
                "model: give shape (with quant) or gguf, one of them".into(),
            )),
        }
    }
}

fn invalid(why: String) -> ScenarioError {
    ScenarioError::Invalid(why)
}
