//! The partition planner: which nodes run which contiguous layers.
//!
//! Pure and deterministic: the same [`PlanInput`] always gives the same
//! [`Plan`], whatever order the nodes are listed in, so every node that
//! computes a plan agrees and the simulator can replay the decision.
//!
//! # Cost model
//! Decoding one token is memory-bound: a stage's time is its weight bytes
//! divided by the node's measured streaming speed ([`NodeSpec::us_per_mib`]).
//! Each hop costs the link's latency plus one token's activations over its
//! bandwidth; the sampled token goes back from the last stage to the first
//! over one more hop. Per-token latency is the sum around that ring;
//! throughput with many requests in flight is bounded by the slowest stage.
//!
//! # Search
//! Every ordered selection of up to [`PLANNER_NODES_MAX`] candidate nodes is
//! tried (branch and bound on the latency), and for each the best cut points
//! are found by dynamic programming over layers under the nodes' memory
//! caps. A node that would only add a hop is never chosen: leaving it out is
//! another candidate with lower cost.

use std::fmt;
use std::ops::Range;

/// Most nodes the exhaustive search orders: 1,956 orderings of 6 nodes,
/// each with a layer DP, stay well under a second even unpruned. With more nodes, the fastest
/// [`PLANNER_NODES_MAX`] (then the largest) are the candidates.
pub const PLANNER_NODES_MAX: usize = 6;

/// Rows of a forward pass up to which each extra row costs
/// [`NodeSpec::row_us_per_mib`] (a batch of decoding sequences); rows past
/// it cost [`NodeSpec::prompt_row_us_per_mib`] (a prompt's pieces).
pub const BATCH_ROWS_KNEE: usize = 4;

/// What the planner knows about one node.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeSpec {
    /// Stable node id; ties between equal plans break on it.
    pub id: String,
    /// Measured time to stream one MiB of this model's weights through a
    /// decode step, microseconds (calibration at node start).
    pub us_per_mib: f64,
    /// What each extra row of a pass adds, per MiB of weights, up to
    /// [`BATCH_ROWS_KNEE`] rows: batched sequences share the weight reads,
    /// so a row costs a fraction of a one-row pass (measured at start).
    pub row_us_per_mib: f64,
    /// What each row past [`BATCH_ROWS_KNEE`] adds, per MiB (measured on a
    /// 64-row prompt pass: compute-bound, attention grows with the rows).
    pub prompt_row_us_per_mib: f64,
    /// Memory the node may use for weights and KV cache, bytes.
    pub memory_bytes: u64,
}

impl NodeSpec {
    /// A node whose passes cost the same per row as its one-row pass
    /// (no batching gain): what the planner assumed before rows were measured.
    pub fn flat(id: impl Into<String>, us_per_mib: f64, memory_bytes: u64) -> NodeSpec {
        NodeSpec {
            id: id.into(),
            us_per_mib,
            row_us_per_mib: us_per_mib,
            prompt_row_us_per_mib: us_per_mib,
            memory_bytes,
        }
    }

    /// Microseconds of one forward pass of `rows` rows (all sequences
    /// together) through `mib` MiB of weights: the cost model the planner
    /// (one row) and the simulator (batches, prompts) share.
    pub fn pass_us(&self, mib: f64, rows: usize) -> f64 {
        if rows == 0 {
            return 0.0;
        }
        let small = rows.min(BATCH_ROWS_KNEE);
        mib * (self.us_per_mib
            + (small - 1) as f64 * self.row_us_per_mib
            + (rows - small) as f64 * self.prompt_row_us_per_mib)
    }
}

/// Bytes a data-plane message adds to its payload: shoal's frame and
/// message header, QUIC's short header and frame, UDP/IP.
pub const MESSAGE_OVERHEAD_BYTES: u64 = 96;

/// A measured link between two nodes (one direction).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkSpec {
    /// One-way latency, microseconds.
    pub latency_us: f64,
    /// Throughput, bytes per second.
    pub bytes_per_second: f64,
}

impl LinkSpec {
    /// A link on the same machine: what loopback costs a QUIC frame.
    pub const LOCAL: LinkSpec = LinkSpec {
        latency_us: 50.0,
        bytes_per_second: 2e9,
    };

    /// Microseconds from sending a message of `bytes` to its arrival.
    pub fn send_us(&self, bytes: u64) -> f64 {
        self.latency_us + self.transfer_us(bytes)
    }

    /// Microseconds the sender's side of the link is busy with a message of
    /// `bytes` (its framing included): messages queue behind each other.
    pub fn transfer_us(&self, bytes: u64) -> f64 {
        (bytes + MESSAGE_OVERHEAD_BYTES) as f64 * 1e6 / self.bytes_per_second.max(1.0)
    }
}

/// The model as the planner sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    /// Weight bytes of each layer.
    pub layer_bytes: Vec<u64>,
    /// Extra bytes held by the first stage (token embedding).
    pub first_bytes: u64,
    /// Extra bytes held and streamed by the last stage (norm, output head).
    pub last_bytes: u64,
    /// The last stage's extra work per token (head, logits), as the bytes
    /// of layer weights that take as long: a head in another quant type
    /// than the layers runs at another speed per byte. Calibrated by the
    /// node (see `cluster::calibrate`); `last_bytes` when unknown.
    pub last_compute_bytes: u64,
    /// KV cache bytes per token of context per layer.
    pub kv_bytes_per_token_layer: u64,
    /// Context tokens each stage reserves cache for.
    pub context_tokens: u64,
    /// Bytes of one token's activations between stages.
    pub activation_bytes: u64,
}

impl ModelSpec {
    /// Memory a stage running `layers` needs: weights and a full KV cache.
    pub fn stage_memory(&self, layers: Range<usize>) -> u64 {
        let n = self.layer_bytes.len();
        let mut bytes: u64 = self.layer_bytes[layers.clone()].iter().sum();
        if layers.start == 0 {
            bytes += self.first_bytes;
        }
        if layers.end == n {
            bytes += self.last_bytes;
        }
        bytes + layers.len() as u64 * self.kv_bytes_per_token_layer * self.context_tokens
    }

    /// Weight bytes a decode step streams for `layers` (the embedding is a
    /// row lookup, so it costs nothing).
    pub fn streamed_bytes(&self, layers: Range<usize>) -> u64 {
        let mut bytes: u64 = self.layer_bytes[layers.clone()].iter().sum();
        if layers.end == self.layer_bytes.len() {
            bytes += self.last_compute_bytes;
        }
        bytes
    }

    /// The planner's view of a model: `kv_bytes_per_element` is 2 for an f16
    /// cache (CPU), 4 for f32 (GPU).
    pub fn from_layout(
        layout: &crate::ModelLayout,
        context_tokens: u64,
        kv_bytes_per_element: u64,
    ) -> ModelSpec {
        let c = &layout.config;
        let n = layout.layers.len();
        let all = layout.stage_bytes(0..n);
        let layers: u64 = layout.layers.iter().map(|l| l.bytes()).sum();
        let last = layout.output_norm.size_bytes
            + layout
                .output
                .as_ref()
                .unwrap_or(&layout.token_embd)
                .size_bytes;
        ModelSpec {
            layer_bytes: layout.layers.iter().map(|l| l.bytes()).collect(),
            first_bytes: all.saturating_sub(layers + last),
            last_bytes: last,
            last_compute_bytes: last,
            kv_bytes_per_token_layer: (2 * c.n_kv_heads * c.head_dim) as u64 * kv_bytes_per_element,
            context_tokens,
            activation_bytes: c.dim as u64 * 4,
        }
    }

    /// Memory to hold the whole model on one node.
    pub fn total_memory(&self) -> u64 {
        self.stage_memory(0..self.layer_bytes.len())
    }
}

/// What to optimise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PlanGoal {
    /// Lowest per-token latency for one request (the default).
    #[default]
    Latency,
    /// Highest throughput with many requests in flight (slowest stage).
    Throughput,
}

/// Everything the planner decides from.
#[derive(Debug, Clone)]
pub struct PlanInput {
    /// The model.
    pub model: ModelSpec,
    /// Candidate nodes.
    pub nodes: Vec<NodeSpec>,
    /// `links[i][j]`: the link from `nodes[i]` to `nodes[j]`.
    pub links: Vec<Vec<LinkSpec>>,
    /// What to optimise.
    pub goal: PlanGoal,
}

/// One stage of a plan.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedStage {
    /// The node's id.
    pub node_id: String,
    /// Its layers.
    pub layers: Range<usize>,
    /// Memory it needs, bytes.
    pub memory_bytes: u64,
    /// Predicted compute per decoded token, microseconds.
    pub compute_us: f64,
    /// Predicted time to send one token's output to the next stage, microseconds.
    pub send_us: f64,
}

/// The planner's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Stages in pipeline order; layers contiguous, covering the model.
    pub stages: Vec<PlannedStage>,
    /// Predicted time per generated token of one request, microseconds.
    pub token_latency_us: f64,
    /// Predicted tokens per second with the pipeline full.
    pub throughput_tokens_per_s: f64,
}

impl fmt::Display for Plan {
    /// One line: `a[0..15) -> b[15..30) | 16.1 ms/token, 120.4 tok/s full`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.stages.iter().enumerate() {
            if i > 0 {
                write!(f, " -> ")?;
            }
            let short: String = s
                .node_id
                .chars()
                .rev()
                .take(6)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            write!(f, "{short}[{}..{})", s.layers.start, s.layers.end)?;
        }
        write!(
            f,
            " | {:.1} ms/token, {:.1} tok/s full",
            self.token_latency_us / 1000.0,
            self.throughput_tokens_per_s
        )
    }
}

/// Why no plan exists.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    /// No nodes to plan over.
    #[error("no nodes to run the model on")]
    NoNodes,
    /// The model has no layers.
    #[error("the model has no layers")]
    NoLayers,
    /// The links matrix does not match the nodes.
    #[error("links matrix is {rows}x? for {nodes} nodes")]
    BadLinks {
        /// Rows given.
        rows: usize,
        /// Nodes given.
        nodes: usize,
    },
    /// Not enough memory in any combination of nodes.
    #[error(
        "the model needs {} MiB but the nodes can offer {} MiB in any split ({} MiB missing): add a node or raise --max-memory",
        needed_bytes >> 20, available_bytes >> 20, (needed_bytes.saturating_sub(*available_bytes) >> 20).max(1)
    )]
    DoesNotFit {
        /// Memory the whole model needs (weights and KV cache).
        needed_bytes: u64,
        /// Memory of all candidate nodes together.
        available_bytes: u64,
    },
}

/// Finds the best plan for `input`.
pub fn plan(input: &PlanInput) -> Result<Plan, PlanError> {
    let n_layers = input.model.layer_bytes.len();
    if n_layers == 0 {
        return Err(PlanError::NoLayers);
    }
    if input.nodes.is_empty() {
        return Err(PlanError::NoNodes);
    }
    if input.links.len() != input.nodes.len()
        || input.links.iter().any(|r| r.len() != input.nodes.len())
    {
        return Err(PlanError::BadLinks {
            rows: input.links.len(),
            nodes: input.nodes.len(),
        });
    }
    let candidates = candidates(&input.nodes);
    let mut search = Search {
        input,
        candidates: &candidates,
        best: None,
        order: Vec::new(),
    };
    search.extend(0);
    match search.best {
        Some(best) => Ok(best.plan),
        None => Err(PlanError::DoesNotFit {
            needed_bytes: input.model.total_memory(),
            available_bytes: candidates
                .iter()
                .map(|&i| input.nodes[i].memory_bytes)
                .sum(),
        }),
    }
}

/// Indices of the nodes the search considers, in id order (determinism
/// does not depend on how the caller listed them).
fn candidates(nodes: &[NodeSpec]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..nodes.len()).collect();
    idx.sort_by(|&a, &b| nodes[a].id.cmp(&nodes[b].id));
    if idx.len() > PLANNER_NODES_MAX {
        idx.sort_by(|&a, &b| {
            let (x, y) = (&nodes[a], &nodes[b]);
            x.us_per_mib
                .total_cmp(&y.us_per_mib)
                .then(y.memory_bytes.cmp(&x.memory_bytes))
                .then(x.id.cmp(&y.id))
        });
        idx.truncate(PLANNER_NODES_MAX);
        idx.sort_by(|&a, &b| nodes[a].id.cmp(&nodes[b].id));
    }
    idx
}

struct Scored {
    /// (primary, secondary) cost, lower is better.
    key: (f64, f64),
    plan: Plan,
}

struct Search<'a> {
    input: &'a PlanInput,
    candidates: &'a [usize],
    best: Option<Scored>,
    order: Vec<usize>,
}

impl Search<'_> {
    /// Tries the current ordering, then every extension of it.
    fn extend(&mut self, depth: usize) {
        if !self.order.is_empty() {
            if let Some(scored) = self.evaluate() {
                let better = match &self.best {
                    None => true,
                    Some(b) => scored.key < b.key,
                };
                if better {
                    self.best = Some(scored);
                }
            }
        }
        if depth == self.candidates.len() || depth == self.input.model.layer_bytes.len() {
            return;
        }
        for k in 0..self.candidates.len() {
            let node = self.candidates[k];
            if self.order.contains(&node) {
                continue;
            }
            self.order.push(node);
            if !self.pruned() {
                self.extend(depth + 1);
            }
            self.order.pop();
        }
    }

    /// True when every plan that starts with this ordering costs more than the
    /// best found: extending it keeps these hops (all but the closing one)
    /// and its layers cost at least what the fastest candidate would take.
    fn pruned(&self) -> bool {
        let Some(best) = &self.best else {
            return false;
        };
        if self.input.goal != PlanGoal::Latency {
            return false;
        }
        let m = &self.input.model;
        let fastest = self
            .candidates
            .iter()
            .map(|&i| self.input.nodes[i].us_per_mib)
            .fold(f64::INFINITY, f64::min);
        let compute = fastest * mib(m.streamed_bytes(0..m.layer_bytes.len()));
        self.hops_us() - self.closing_us() + compute > best.key.0 + 1e-9
    }

    /// Sum of all hop costs around the ring for the current ordering.
    fn hops_us(&self) -> f64 {
        let k = self.order.len();
        if k < 2 {
            return 0.0;
        }
        let act = self.input.model.activation_bytes;
        (0..k - 1)
            .map(|i| self.input.links[self.order[i]][self.order[i + 1]].send_us(act))
            .sum::<f64>()
            + self.closing_us()
    }

    /// The last stage sends the token (4 bytes) back to the first.
    fn closing_us(&self) -> f64 {
        let k = self.order.len();
        if k < 2 {
            return 0.0;
        }
        self.input.links[self.order[k - 1]][self.order[0]].send_us(4)
    }

    /// Best cut points for the current ordering under memory caps (every
    /// node gets at least one layer), scored by the goal.
    fn evaluate(&self) -> Option<Scored> {
        let m = &self.input.model;
        let n = m.layer_bytes.len();
        let k = self.order.len();
        // dp[s][e]: best (max stage compute, sum compute) with stages 0..=s covering 0..e.
        const NONE: (f64, f64, usize) = (f64::INFINITY, f64::INFINITY, usize::MAX);
        let mut dp = vec![vec![NONE; n + 1]; k];
        for s in 0..k {
            let node = &self.input.nodes[self.order[s]];
            for e in (s + 1)..=n - (k - 1 - s) {
                let starts = if s == 0 { 0..1 } else { s..e };
                for b in starts {
                    let prev = if s == 0 { (0.0, 0.0, 0) } else { dp[s - 1][b] };
                    if prev.0.is_infinite() {
                        continue;
                    }
                    if m.stage_memory(b..e) > node.memory_bytes {
                        continue;
                    }
                    let c = node.pass_us(mib(m.streamed_bytes(b..e)), 1);
                    let cand = (prev.0.max(c), prev.1 + c, b);
                    if self.better(cand, dp[s][e]) {
                        dp[s][e] = cand;
                    }
                }
            }
        }
        if dp[k - 1][n].0.is_infinite() {
            return None;
        }
        let mut cuts = vec![n];
        let mut e = n;
        for s in (0..k).rev() {
            e = dp[s][e].2;
            cuts.push(e);
        }
        cuts.reverse();
        Some(self.score(&cuts))
    }

    fn better(&self, a: (f64, f64, usize), b: (f64, f64, usize)) -> bool {
        match self.input.goal {
            PlanGoal::Latency => (a.1, a.0) < (b.1, b.0),
            PlanGoal::Throughput => (a.0, a.1) < (b.0, b.1),
        }
    }

    fn score(&self, cuts: &[usize]) -> Scored {
        let split: Vec<(usize, Range<usize>)> = self
            .order
            .iter()
            .enumerate()
            .map(|(s, &node)| (node, cuts[s]..cuts[s + 1]))
            .collect();
        let plan = evaluate(self.input, &split);
        let slowest = plan
            .stages
            .iter()
            .map(|s| s.compute_us.max(s.send_us))
            .fold(0.0, f64::max);
        let key = match self.input.goal {
            PlanGoal::Latency => (plan.token_latency_us, slowest),
            PlanGoal::Throughput => (slowest, plan.token_latency_us),
        };
        Scored { key, plan }
    }
}

/// The cost model's [`Plan`] for a given split: `(index into input.nodes,
/// layers)` per stage in pipeline order, layers contiguous and covering the
/// model (the caller checks). The planner scores every candidate with it;
/// the simulator prices a split a real cluster chose.
pub fn evaluate(input: &PlanInput, split: &[(usize, Range<usize>)]) -> Plan {
    let m = &input.model;
    let k = split.len();
    let mut stages = Vec::with_capacity(k);
    for (s, (id, layers)) in split.iter().enumerate() {
        let node = &input.nodes[*id];
        let next = split[(s + 1) % k].0;
        let send_us = if k == 1 {
            0.0
        } else if s + 1 == k {
            input.links[*id][next].send_us(4)
        } else {
            input.links[*id][next].send_us(m.activation_bytes)
        };
        stages.push(PlannedStage {
            node_id: node.id.clone(),
            memory_bytes: m.stage_memory(layers.clone()),
            compute_us: node.pass_us(mib(m.streamed_bytes(layers.clone())), 1),
            layers: layers.clone(),
            send_us,
        });
    }
    let latency: f64 = stages.iter().map(|s| s.compute_us + s.send_us).sum();
    let slowest = stages
        .iter()
        .map(|s| s.compute_us.max(s.send_us))
        .fold(0.0, f64::max);
    Plan {
        stages,
        token_latency_us: latency,
        throughput_tokens_per_s: 1e6 / slowest.max(1e-3),
    }
}

/// Bytes in MiB, the unit of the nodes' speeds.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

#[cfg(test)]
mod tests;
