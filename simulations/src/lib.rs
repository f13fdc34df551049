//! shoal's cluster simulator: what a cluster of given machines and links
//! would do with a model and a load, before anyone buys or wires them.
//!
//! A deterministic discrete-event simulation drives the *same* parts
//! `shoal node` runs: the planner and its cost model
//! ([`sharding::planner`], [`sharding::NodeSpec::pass_us`]) choose the split
//! and price each forward pass, and each stage's queue is the node's own
//! continuous batcher ([`schedule::Batcher`]) fed with rows
//! instead of tensors. Only compute and transfer are modelled: no model
//! runs, so a 70B model on eight laptops simulates in milliseconds.
//!
//! # Layout
//! - [`shapes`]: named model shapes (llama-3-8b, …) and quant sizes.
//! - [`scenario`]: the TOML scenario file, resolved to a [`Cluster`] and a [`Load`].
//! - [`sim`]: the event loop.
//! - [`report`]: what comes out (TTFT, per-token latency, throughput,
//!   stage utilisation, bottleneck) as a table or JSON.
//! - [`svg`]: small bar charts for the projections document.
//!
//! Architecture Invariant: no I/O in [`sim`]; the scenario reads a GGUF's
//! header only when the scenario names one.
//! Architecture Invariant: the simulator builds without candle, tokio,
//! libp2p, quinn or axum: it depends on `schedule`, `sharding` and
//! `protocol` only (checked by the `dependency_edges` test), and has no
//! copy of a scheduling decision of its own.

pub mod report;
pub mod scenario;
pub mod shapes;
pub mod sim;
pub mod svg;

pub use report::{Dist, Report, StageReport, Summary};
pub use scenario::{Scenario, ScenarioError};
pub use sim::{simulate, Cluster, Host, Link, Load, RequestLog, SimError};

#[cfg(test)]
mod tests;
