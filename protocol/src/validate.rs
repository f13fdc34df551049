//! The checks a receiver (and, first, the sender) runs on every message:
//! each limit of [`crate::limits`] and each invariant a node relies on.

use crate::limits::*;
use crate::message::{Activations, MemberAddrs, Message, Plan};

/// Why a message was refused. Each variant names what broke the rule and
/// by how much, so a log line is enough to find the peer's bug.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ValidationError {
    /// A text field is longer than its limit.
    #[error("{what} of {bytes} bytes, at most {max}")]
    TooLong {
        /// Which field.
        what: &'static str,
        /// Its length.
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// A list has a count outside its bounds.
    #[error("{count} {what} ({min}..={max})")]
    Count {
        /// What is counted.
        what: &'static str,
        /// How many.
        count: usize,
        /// Fewest allowed.
        min: usize,
        /// Most allowed.
        max: usize,
    },
    /// A plan's stages leave a gap, overlap or are empty.
    #[error("plan stages must be contiguous and non-empty: {start}..{end} after layer {after}")]
    PlanGap {
        /// The stage's first layer.
        start: u32,
        /// Its end.
        end: u32,
        /// Where the previous stage ended.
        after: u32,
    },
    /// A number outside what any real machine or link measures (or not a
    /// number): a member claiming it to win every layer is refused.
    #[error("{what} of {value} is outside {min}..={max}")]
    OutOfRange {
        /// Which number.
        what: &'static str,
        /// Its value.
        value: f64,
        /// Smallest allowed.
        min: f64,
        /// Largest allowed.
        max: f64,
    },
    /// A plan does not cover the model.
    #[error("plan covers layers 0..{covered} of {layers}")]
    PlanCoverage {
        /// Layers covered.
        covered: u32,
        /// Layers in the model.
        layers: u32,
    },
    /// A request's context cannot hold its prompt or is over the limit.
    #[error("context of {context} tokens for a {prompt}-token prompt (at most {max})")]
    Context {
        /// Context tokens.
        context: u32,
        /// Prompt tokens.
        prompt: usize,
        /// The limit.
        max: usize,
    },
    /// A weight index whose sizes disagree.
    #[error("weight index of {chunks} chunks of {chunk_bytes} bytes for {file_bytes} bytes")]
    WeightIndex {
        /// Chunk hashes listed.
        chunks: usize,
        /// Bytes per chunk.
        chunk_bytes: u32,
        /// File size.
        file_bytes: u64,
    },
    /// An activation payload of the wrong size.
    #[error("payload of {bytes} bytes, shape [{rows}, {dim}] needs {expected} (at most {max})")]
    Payload {
        /// Bytes sent.
        bytes: usize,
        /// Rows announced.
        rows: u64,
        /// Hidden size announced.
        dim: u32,
        /// Bytes the shape needs.
        expected: u64,
        /// The limit.
        max: usize,
    },
    /// A number that must be finite and non-negative is not.
    #[error("{what} is {value}, expected a finite number >= 0")]
    NotFinite {
        /// Which field.
        what: &'static str,
        /// Its value.
        value: f32,
    },
}

fn count(what: &'static str, n: usize, min: usize, max: usize) -> Result<(), ValidationError> {
    if n < min || n > max {
        return Err(ValidationError::Count {
            what,
            count: n,
            min,
            max,
        });
    }
    Ok(())
}

/// Checks that `value` is finite and within `min..=max`.
fn within(what: &'static str, value: f64, min: f64, max: f64) -> Result<(), ValidationError> {
    if value.is_finite() && (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(ValidationError::OutOfRange {
            what,
            value,
            min,
            max,
        })
    }
}

/// A node's measured speeds and sizes, in the ranges of real hardware.
fn validate_capabilities(c: &crate::message::Capabilities) -> Result<(), ValidationError> {
    within("threads", f64::from(c.threads), 1.0, THREADS_MAX as f64)?;
    within(
        "memory bytes",
        c.memory_bytes as f64,
        0.0,
        MEMORY_BYTES_MAX as f64,
    )?;
    // Microseconds per MiB of weights: a pass faster than 1 ns per MiB
    // or slower than 1000 s per MiB is no machine.
    within("µs per MiB", f64::from(c.us_per_mib), 1e-3, 1e9)?;
    within("row µs per MiB", f64::from(c.row_us_per_mib), 0.0, 1e9)?;
    within(
        "prompt row µs per MiB",
        f64::from(c.prompt_row_us_per_mib),
        0.0,
        1e9,
    )
}

impl Message {
    /// Checks every limit and invariant a receiver relies on; the error
    /// says which.
    pub fn validate(&self) -> Result<(), ValidationError> {
        match self {
            Message::Hello(h) => {
                validate_capabilities(&h.capabilities)?;
                name(&h.node_id, "node id")?;
                name(&h.cluster, "cluster name")?;
                name(&h.capabilities.data_addr, "data address")?;
                name(&h.capabilities.kernels, "kernel family")?;
                name(&h.capabilities.http_addr, "http address")?;
                name(&h.capabilities.name, "node name")?;
                count("addresses", h.capabilities.addrs.len(), 0, ADDRS_MAX)?;
                h.capabilities
                    .addrs
                    .iter()
                    .try_for_each(|a| name(a, "address"))
            }
            Message::Plan(p) => validate_plan(p),
            Message::Activations(a) => validate_activations(a),
            Message::Tokens(t) => {
                count(
                    "tokens in one message",
                    t.entries.len(),
                    0,
                    REQUESTS_PER_MESSAGE_MAX,
                )?;
                count(
                    "log-probabilities in one message",
                    t.logprobs.len(),
                    0,
                    t.entries.len(),
                )?;
                t.logprobs.iter().try_for_each(|l| {
                    count(
                        "top log-probabilities",
                        l.top.len(),
                        0,
                        usize::from(TOP_LOGPROBS_MAX),
                    )?;
                    std::iter::once(l.logprob)
                        .chain(l.top.iter().map(|t| t.1))
                        .try_for_each(|v| within("log-probability", f64::from(v), -1e30, 0.0))
                })
            }
            Message::Join(j) => {
                name(&j.cluster, "cluster name")?;
                if j.sealed_hello.bytes.len() > SEALED_HELLO_BYTES_MAX {
                    return Err(ValidationError::TooLong {
                        what: "sealed hello",
                        bytes: j.sealed_hello.bytes.len(),
                        max: SEALED_HELLO_BYTES_MAX,
                    });
                }
                Ok(())
            }
            Message::Welcome(w) => {
                Message::Hello(w.hello.clone()).validate()?;
                validate_members(&w.members)
            }
            Message::Refused { reason } => text(reason, "reason"),
            Message::PlanUpdate { plan, members } => {
                validate_plan(plan)?;
                validate_members(members)
            }
            Message::Weights { index: w, .. } => {
                let chunks = w.file_bytes.div_ceil(u64::from(w.chunk_bytes.max(1)));
                if w.chunk_bytes == 0
                    || w.chunk_bytes as usize > CHUNK_BYTES_MAX
                    || w.chunk_hashes.len() as u64 != chunks
                    || w.have.len() != w.chunk_hashes.len()
                    || w.chunk_hashes.len() > CHUNKS_MAX
                    || w.layer_hashes.len() > LAYERS_MAX
                    || w.header_bytes > w.file_bytes
                    || w.file_bytes > MODEL_BYTES_MAX
                {
                    return Err(ValidationError::WeightIndex {
                        chunks: w.chunk_hashes.len(),
                        chunk_bytes: w.chunk_bytes,
                        file_bytes: w.file_bytes,
                    });
                }
                Ok(())
            }
            Message::Chunk { bytes, .. } => {
                if bytes.len() > CHUNK_BYTES_MAX {
                    return Err(ValidationError::TooLong {
                        what: "chunk",
                        bytes: bytes.len(),
                        max: CHUNK_BYTES_MAX,
                    });
                }
                Ok(())
            }
            Message::WeightsQuery { .. } | Message::ChunkQuery { .. } | Message::Preparing => {
                Ok(())
            }
            Message::LinkReport { links } => {
                count("links", links.len(), 0, MEMBERS_MAX)?;
                links.iter().try_for_each(|l| {
                    within(
                        "link bytes per second",
                        l.bytes_per_second,
                        0.0,
                        LINK_BYTES_PER_SECOND_MAX,
                    )?;
                    name(&l.node_id, "node id")
                })
            }
            Message::Begin(b) => {
                name(&b.origin, "origin")?;
                let sm = &b.sampling;
                within("temperature", f64::from(sm.temperature), 0.0, 100.0)?;
                within("top_p", f64::from(sm.top_p), 0.0, 1.0)?;
                within("min_p", f64::from(sm.min_p), 0.0, 1.0)?;
                within("repeat_penalty", f64::from(sm.repeat_penalty), 0.0, 100.0)?;
                within(
                    "presence_penalty",
                    f64::from(sm.presence_penalty),
                    -2.0,
                    2.0,
                )?;
                within(
                    "frequency_penalty",
                    f64::from(sm.frequency_penalty),
                    -2.0,
                    2.0,
                )?;
                count("prompt tokens", b.prompt.len(), 1, CONTEXT_TOKENS_MAX)?;
                count("prompt length", b.prompt_len as usize, 1, b.prompt.len())?;
                if let Some(c) = &b.constraint {
                    count("grammar bytes", c.text().len(), 1, CONSTRAINT_BYTES_MAX)?;
                }
                if let Some(n) = b.logprobs {
                    count(
                        "top log-probabilities",
                        usize::from(n),
                        0,
                        usize::from(TOP_LOGPROBS_MAX),
                    )?;
                }
                if b.context as usize > CONTEXT_TOKENS_MAX || (b.context as usize) < b.prompt.len()
                {
                    return Err(ValidationError::Context {
                        context: b.context,
                        prompt: b.prompt.len(),
                        max: CONTEXT_TOKENS_MAX,
                    });
                }
                Ok(())
            }
            Message::Input(i) => {
                count("input tokens", i.tokens.len(), 1, TOKENS_PER_MESSAGE_MAX)?;
                drafts(i.draft, i.tokens.len() as u32, i.sample)
            }
            Message::Failed { error, .. } => {
                // All its texts together, as the one reason string was.
                let bytes: usize = error.texts().map(str::len).sum();
                if bytes > TEXT_BYTES_MAX {
                    return Err(ValidationError::TooLong {
                        what: "reason",
                        bytes,
                        max: TEXT_BYTES_MAX,
                    });
                }
                Ok(())
            }
            Message::Load(l) => {
                finite(l.tokens_per_s, "load tokens/s")?;
                finite(l.busy, "load busy")
            }
            Message::Distrust { node_id, reason } => {
                name(node_id, "node id")?;
                longest(reason, "reason", TEXT_BYTES_MAX)
            }
            Message::Cancel { .. } | Message::Ack | Message::Leaving => Ok(()),
        }
    }
}

fn finite(x: f32, what: &'static str) -> Result<(), ValidationError> {
    if x.is_finite() && x >= 0.0 {
        Ok(())
    } else {
        Err(ValidationError::NotFinite { what, value: x })
    }
}

fn longest(s: &str, what: &'static str, max: usize) -> Result<(), ValidationError> {
    if s.len() > max {
        return Err(ValidationError::TooLong {
            what,
            bytes: s.len(),
            max,
        });
    }
    Ok(())
}

fn text(s: &str, what: &'static str) -> Result<(), ValidationError> {
    longest(s, what, TEXT_BYTES_MAX)
}

fn name(s: &str, what: &'static str) -> Result<(), ValidationError> {
    longest(s, what, NAME_BYTES_MAX)
}

fn validate_members(members: &[MemberAddrs]) -> Result<(), ValidationError> {
    count("members", members.len(), 0, MEMBERS_MAX)?;
    for m in members {
        name(&m.node_id, "node id")?;
        count("addresses", m.addrs.len(), 0, ADDRS_MAX)?;
        m.addrs.iter().try_for_each(|a| name(a, "address"))?;
    }
    Ok(())
}

fn validate_plan(p: &Plan) -> Result<(), ValidationError> {
    count("plan stages", p.stages.len(), 1, STAGES_MAX)?;
    within("plan token latency µs", p.token_latency_us, 0.0, 1e12)?;
    within(
        "plan tokens per second",
        p.throughput_tokens_per_s,
        0.0,
        1e12,
    )?;
    let mut next = 0;
    for s in &p.stages {
        name(&s.node_id, "node id")?;
        if s.layers_start != next || s.layers_end <= s.layers_start {
            return Err(ValidationError::PlanGap {
                start: s.layers_start,
                end: s.layers_end,
                after: next,
            });
        }
        next = s.layers_end;
    }
    if next != p.n_layers {
        return Err(ValidationError::PlanCoverage {
            covered: next,
            layers: p.n_layers,
        });
    }
    Ok(())
}

/// Proposals to verify: at most the rows (all of them in a chunk that
/// continues one in flight), within the limit, and only in a chunk the
/// last stage samples after.
fn drafts(draft: u32, rows: u32, sample: bool) -> Result<(), ValidationError> {
    if draft == 0 {
        return Ok(());
    }
    count(
        "proposed tokens",
        draft as usize,
        0,
        (DRAFT_TOKENS_MAX.min(rows) as usize) * usize::from(sample),
    )
}

fn validate_activations(a: &Activations) -> Result<(), ValidationError> {
    count(
        "sequences in one batch",
        a.batch.len(),
        1,
        REQUESTS_PER_MESSAGE_MAX,
    )?;
    let mut rows = 0u64;
    for s in &a.batch {
        count(
            "rows of one sequence",
            s.rows as usize,
            1,
            TOKENS_PER_MESSAGE_MAX,
        )?;
        drafts(s.draft, s.rows, s.sample)?;
        rows += u64::from(s.rows);
    }
    let drafted: usize = a.batch.iter().map(|s| s.draft as usize).sum();
    count("proposals", a.proposals.len(), drafted, drafted)?;
    let expected = rows * u64::from(a.dim) * a.dtype.size() as u64;
    if a.payload.len() > TENSOR_BYTES_MAX || expected != a.payload.len() as u64 {
        return Err(ValidationError::Payload {
            bytes: a.payload.len(),
            rows,
            dim: a.dim,
            expected,
            max: TENSOR_BYTES_MAX,
        });
    }
    Ok(())
}
