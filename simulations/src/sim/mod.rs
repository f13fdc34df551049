//! The event loop: requests arrive, stages run forward passes chosen by the
//! node's batcher and priced by the planner's cost model, activations and
//! tokens cross links with latency, bandwidth and jitter.
//!
//! What a request does here is what it does in `shoal node`: the origin
//! (the node the request arrived at) sends the prompt to the first stage in
//! pieces of [`schedule::PROMPT_CHUNK_TOKENS`]; each stage queues chunks in a
//! [`Batcher`] and, when idle, runs the batch it picks (the first stage of a
//! pipeline keeps one micro-batch per stage); hidden states of a batch go on
//! in one message; the last stage samples and each token goes back to the
//! origin, which sends it to the first stage as the next one-row chunk
//! (with speculation, with proposals, more of them in flight: the
//! origin's own `schedule::flight`).
//!
//! Deterministic: time is integer nanoseconds, ties break on insertion
//! order, and the only randomness (link jitter, open-loop arrivals, prompt
//! lengths) comes from one seeded generator.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::ops::Range;
use std::time::{Duration, Instant};

use protocol::SeqRows;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use schedule::flight::{Chunk, Drawn, Flight, Reach};
use schedule::{micro_batch_cap, prompt_chunks, Batcher, Next, Rows, Work};
use sharding::planner::mib;
use sharding::{
    evaluate, plan, LinkSpec, ModelSpec, NodeSpec, Plan, PlanError, PlanGoal, PlanInput,
};

use crate::report::{Report, Run};

/// Events one simulation may process: a runaway scenario stops with an
/// error instead of spinning.
pub const EVENTS_MAX: u64 = 200_000_000;
/// Requests one simulation may run.
pub const REQUESTS_MAX: usize = 1_000_000;
/// Closed-loop clients one simulation may run.
pub const STREAMS_MAX: usize = 100_000;

/// One direction of a link between two nodes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Link {
    /// Latency and bandwidth, as the planner sees them.
    pub spec: LinkSpec,
    /// Mean extra delay per message, microseconds (exponentially
    /// distributed; messages on a link still arrive in order, as on a QUIC
    /// stream).
    pub jitter_us: f64,
}

/// The machines and the model.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// The model as the planner sees it.
    pub model: ModelSpec,
    /// The nodes (ids are their names).
    pub nodes: Vec<NodeSpec>,
    /// `links[i][j]`: from node `i` to node `j` (the diagonal is unused).
    pub links: Vec<Vec<Link>>,
    /// What the planner optimises.
    pub goal: PlanGoal,
    /// A fixed split (node index, layers) instead of the planner's: to
    /// replay what a real cluster chose, or to try every split.
    pub split: Option<Vec<(usize, Range<usize>)>>,
    /// The node requests arrive at; `None`: the first stage's node.
    pub entry: Option<usize>,
    /// Machines shared by several nodes; a node in none has a machine to
    /// itself.
    pub hosts: Vec<Host>,
}

impl Cluster {
    /// The index of the node named `id`.
    pub fn index_of(&self, id: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.id == id)
    }

    /// The split a report ran, as a fixed split of this cluster.
    pub fn split_of(&self, r: &Report) -> Vec<(usize, Range<usize>)> {
        r.stages
            .iter()
            .map(|s| {
                let i = self.index_of(&s.node).expect("node in report");
                (i, s.layers[0]..s.layers[1])
            })
            .collect()
    }
}

/// A machine several nodes share: when their passes together want more
/// cores than it has, each runs slower in proportion (processor sharing,
/// as the OS scheduler does), e.g. three 1-thread nodes on 2 cores.
#[derive(Debug, Clone, PartialEq)]
pub struct Host {
    /// Cores.
    pub cores: f64,
    /// Its nodes, with the threads each one's pass keeps busy.
    pub nodes: Vec<(usize, f64)>,
}

/// The requests.
#[derive(Debug, Clone, PartialEq)]
pub struct Load {
    /// Closed loop: this many clients, each sending its next request when
    /// the last one is answered (what `bench/load.py` does).
    pub streams: Option<usize>,
    /// Open loop: requests arrive at this mean rate (Poisson), whatever
    /// the cluster's pace.
    pub rate_per_s: Option<f64>,
    /// Requests in all.
    pub requests: usize,
    /// Prompt tokens of each request (the least, when `prompt_tokens_max`).
    pub prompt_tokens: usize,
    /// Prompt lengths drawn uniformly from `prompt_tokens..=prompt_tokens_max`.
    pub prompt_tokens_max: Option<usize>,
    /// Tokens generated per request.
    pub output_tokens: usize,
    /// Seed of the generator (jitter, arrivals, prompt lengths).
    pub seed: u64,
    /// Speculative decoding: the chance that each proposed token is
    /// accepted (`None`: no speculation). The proposal length adapts as on
    /// a node (`schedule::speculate`), from the times it measures, and on
    /// a pipeline proposals go on in flight (`schedule::flight`).
    pub acceptance: Option<f64>,
}

/// Why a simulation cannot run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    /// The planner found no split.
    #[error("no plan: {0}")]
    Plan(#[from] PlanError),
    /// A fixed split is not a valid pipeline.
    #[error("bad split: {0}")]
    Split(String),
    /// The load is empty or out of bounds.
    #[error("bad load: {0}")]
    Load(String),
    /// The run did not finish within [`EVENTS_MAX`] events.
    #[error("the simulation ran past {EVENTS_MAX} events")]
    Runaway,
}

/// Runs `load` on `cluster`.
pub fn simulate(cluster: &Cluster, load: &Load) -> Result<Report, SimError> {
    check_load(load)?;
    let longest = load.prompt_tokens_max.unwrap_or(load.prompt_tokens) + load.output_tokens;
    if longest as u64 > cluster.model.context_tokens {
        return Err(SimError::Load(format!(
            "prompt and output reach {longest} tokens, past the model's context of {}",
            cluster.model.context_tokens
        )));
    }
    let input = PlanInput {
        model: cluster.model.clone(),
        nodes: cluster.nodes.clone(),
        links: cluster
            .links
            .iter()
            .map(|r| r.iter().map(|l| l.spec).collect())
            .collect(),
        goal: cluster.goal,
    };
    let plan = match &cluster.split {
        Some(split) => {
            check_split(cluster, split)?;
            evaluate(&input, split)
        }
        None => plan(&input)?,
    };
    let stages: Vec<(usize, Range<usize>)> = plan
        .stages
        .iter()
        .map(|s| {
            let i = cluster.index_of(&s.node_id).expect("planned node exists");
            (i, s.layers.clone())
        })
        .collect();
    let mut world = World::new(cluster, load, &stages);
    world.run()?;
    Ok(world.report(&plan))
}

fn check_load(load: &Load) -> Result<(), SimError> {
    let bad = |s: &str| Err(SimError::Load(s.into()));
    if load.requests == 0 || load.requests > REQUESTS_MAX {
        return bad("requests must be between 1 and 1,000,000");
    }
    if load.output_tokens == 0 || load.prompt_tokens == 0 {
        return bad("prompt and output tokens must be at least 1");
    }
    if load
        .prompt_tokens_max
        .is_some_and(|m| m < load.prompt_tokens)
    {
        return bad("prompt_tokens_max is below prompt_tokens");
    }
    match (load.streams, load.rate_per_s) {
        (Some(0), _) => bad("streams must be at least 1"),
        (Some(s), _) if s > STREAMS_MAX => bad("streams: at most 100,000"),
        (Some(_), Some(_)) => bad("give streams (closed loop) or rate_per_s (open loop), not both"),
        (None, None) => bad("give streams (closed loop) or rate_per_s (open loop)"),
        (None, Some(r)) if !(1e-6..=1e9).contains(&r) => bad("rate_per_s must be 1e-6 to 1e9"),
        _ => Ok(()),
    }
}

/// That `split` is a pipeline over `cluster`: known nodes, layers contiguous
/// and covering the model (what [`sharding::evaluate`] takes for granted).
fn check_split(cluster: &Cluster, split: &[(usize, Range<usize>)]) -> Result<(), SimError> {
    let n = cluster.model.layer_bytes.len();
    let mut next = 0;
    for (node, layers) in split {
        if *node >= cluster.nodes.len() {
            return Err(SimError::Split(format!("node {node} does not exist")));
        }
        if layers.start != next || layers.end <= layers.start {
            return Err(SimError::Split(format!(
                "layers {layers:?} do not continue from layer {next}"
            )));
        }
        next = layers.end;
    }
    if next != n || split.is_empty() {
        return Err(SimError::Split(format!(
            "the split covers {next} of {n} layers"
        )));
    }
    Ok(())
}

mod world;

pub use world::RequestLog;
use world::World;
