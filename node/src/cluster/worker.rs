//! The stage worker: one thread that owns this node's layers and the KV
//! caches of the requests passing through, and runs every forward pass.
//!
//! Messages arrive in order per link (Begin, then Input or Activations
//! chunks, then Cancel), so a request's state machine is simple: Begin
//! allocates, each chunk extends the cache, Cancel frees. The last stage
//! also owns each request's sampler and sends the token to its origin.

use std::collections::HashMap;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{Device, Tensor};
use protocol::{Activations, Begin, DType, Message, SampledToken, SeqRows, Tokens};
use sharding::{GgufFile, ModelLayout};
use tokio::sync::mpsc;
use tracing::{debug, info, info_span, warn};

use crate::model::{LoadOptions, LogitsFor, Stage, StageInput, StageOutput};
use crate::sampling::{Sampler, SamplingParams};
use crate::KvCache;

/// Requests a stage holds caches for at once: bounds KV memory against a
/// flood of Begins (each origin also bounds its own requests).
pub const SEQUENCES_MAX: usize = 64;

/// Messages the worker queue holds: backpressure reaches the QUIC stream
/// (and the previous stage) when this node falls behind.
pub const WORKER_QUEUE: usize = 64;

/// Where a worker's output goes (the data plane; a test double in tests).
pub trait Outbox: Send + Sync {
    /// Sends `msg` to node `to`, waiting while its link is full.
    fn send(&self, to: &str, msg: Message);
}

/// What a worker is told to do.
// Data messages are the common case and move once through a channel:
// boxing them would cost an allocation per message for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum WorkerMsg {
    /// A new plan: run `layers` (none: this node is not in the plan), send
    /// hidden states to `next` (none: this is the last stage).
    Reconfigure {
        /// Plan epoch.
        epoch: u64,
        /// This node's layers.
        layers: Option<Range<usize>>,
        /// The next stage's node id.
        next: Option<String>,
    },
    /// No plan in force: drop requests, keep the layers.
    Pause,
    /// A data-plane message for this stage.
    Data(Message),
}

/// Fixed inputs of a worker.
pub struct WorkerConfig {
    /// This node's id.
    pub me: String,
    /// The model file.
    pub model: PathBuf,
    /// Its layout.
    pub layout: Arc<ModelLayout>,
    /// Device and context.
    pub load: LoadOptions,
    /// Element type of outgoing activations.
    pub dtype: DType,
    /// Requests holding a KV cache here right now (read by status).
    pub live: Arc<std::sync::atomic::AtomicUsize>,
    /// Prometheus metrics.
    pub metrics: Arc<super::metrics::Metrics>,
}

struct Sequence {
    cache: KvCache,
    origin: String,
    /// Last stage only: the sampler and the tokens it penalises.
    sampler: Option<(Sampler, Vec<u32>)>,
}

/// The running worker's state.
pub struct Worker {
    cfg: WorkerConfig,
    out: Arc<dyn Outbox>,
    epoch: u64,
    stage: Option<Stage>,
    next: Option<String>,
    seqs: HashMap<u64, Sequence>,
}

/// Starts the worker; it runs until the sender is dropped.
pub fn spawn(cfg: WorkerConfig, out: Arc<dyn Outbox>) -> mpsc::Sender<WorkerMsg> {
    let (tx, mut rx) = mpsc::channel(WORKER_QUEUE);
    let mut w = Worker {
        cfg,
        out,
        epoch: 0,
        stage: None,
        next: None,
        seqs: HashMap::new(),
    };
    // The loop lives on a thread of rayon's pool (the one shoal's kernels
    // use): a forward pass then starts without handing work to another
    // thread and waiting for it, a wake-up saved twice per token.
    std::thread::Builder::new()
        .name("shoal-stage".into())
        .spawn(move || {
            while let Some(msg) = rx.blocking_recv() {
                w.handle(msg);
            }
        })
        .expect("spawn stage worker");
    tx
}

impl Worker {
    fn handle(&mut self, msg: WorkerMsg) {
        self.dispatch(msg);
        self.cfg
            .live
            .store(self.seqs.len(), std::sync::atomic::Ordering::Relaxed);
        self.cfg.metrics.kv_sequences.set(self.seqs.len() as i64);
    }

    fn dispatch(&mut self, msg: WorkerMsg) {
        match msg {
            WorkerMsg::Reconfigure {
                epoch,
                layers,
                next,
            } => self.reconfigure(epoch, layers, next),
            WorkerMsg::Pause => {
                self.epoch = 0;
                self.seqs.clear();
            }
            WorkerMsg::Data(Message::Begin(b)) => self.begin(b),
            WorkerMsg::Data(Message::Input(i)) => {
                let rows = SeqRows {
                    request_id: i.request_id,
                    position: i.position,
                    rows: i.tokens.len() as u32,
                    sample: i.sample,
                };
                self.run(rows, StageInput::Tokens(&i.tokens));
            }
            WorkerMsg::Data(Message::Activations(a)) => self.activations(a),
            WorkerMsg::Data(Message::Cancel { request_id }) => self.cancel(request_id),
            WorkerMsg::Data(other) => {
                warn!(?other, "stage worker got a message it does not handle")
            }
        }
    }

    fn reconfigure(&mut self, epoch: u64, layers: Option<Range<usize>>, next: Option<String>) {
        self.epoch = epoch;
        self.next = next;
        // Requests of the old plan cannot continue: their origins fail them.
        self.seqs.clear();
        let same = self.stage.as_ref().map(|s| s.layers()) == layers;
        if same {
            return;
        }
        self.stage = None;
        crate::engine::release_freed_heap();
        let Some(layers) = layers else {
            info!("this node is not in the plan: no layers loaded");
            return;
        };
        let t = Instant::now();
        match self.load(layers.clone()) {
            Ok(stage) => {
                info!(
                    layers = ?layers,
                    weight_mib = stage.weight_bytes() >> 20,
                    ms = t.elapsed().as_millis() as u64,
                    "stage loaded"
                );
                self.stage = Some(stage);
            }
            Err(e) => warn!(layers = ?layers, "cannot load stage: {e}"),
        }
    }

    fn load(&self, layers: Range<usize>) -> Result<Stage, crate::EngineError> {
        let gguf = GgufFile::open(&self.cfg.model)?;
        let stage = Stage::load(&gguf, &self.cfg.layout, layers, &self.cfg.load)?;
        stage.prefault(&mut |_, _| {});
        Ok(stage)
    }

    fn begin(&mut self, b: Begin) {
        let fail = |why: String| Message::Failed {
            request_id: b.request_id,
            reason: why,
        };
        let Some(stage) = &self.stage else {
            self.out.send(
                &b.origin,
                fail(format!("node {} holds no layers", self.cfg.me)),
            );
            return;
        };
        if b.epoch != self.epoch {
            self.out.send(
                &b.origin,
                fail(format!(
                    "the cluster's plan changed (request for epoch {}, node {} is on {}); retry",
                    b.epoch, self.cfg.me, self.epoch
                )),
            );
            return;
        }
        if self.seqs.len() >= SEQUENCES_MAX && !self.seqs.contains_key(&b.request_id) {
            self.out.send(
                &b.origin,
                fail(format!(
                    "node {} is at its limit of {SEQUENCES_MAX} requests",
                    self.cfg.me
                )),
            );
            return;
        }
        let sampler = stage.is_last().then(|| {
            (
                Sampler::new(SamplingParams::from(&b.sampling)),
                b.prompt.clone(),
            )
        });
        self.seqs.insert(
            b.request_id,
            Sequence {
                cache: stage.new_cache(b.context as usize),
                origin: b.origin.clone(),
                sampler,
            },
        );
        if let Some(next) = &self.next {
            self.out.send(next, Message::Begin(b));
        }
    }

    fn activations(&mut self, a: Activations) {
        let mut offset = 0usize;
        for rows in &a.batch {
            let n = rows.rows as usize * a.dim as usize;
            let bytes = n * a.dtype.size();
            let values = decode_payload(&a.payload[offset..offset + bytes], a.dtype);
            offset += bytes;
            let hidden =
                Tensor::from_vec(values, (rows.rows as usize, a.dim as usize), &Device::Cpu);
            match hidden {
                Ok(h) => self.run(*rows, StageInput::Hidden(h)),
                Err(e) => self.fail(rows.request_id, format!("bad activations: {e}")),
            }
        }
    }

    /// Runs one chunk of one request and sends the result on.
    fn run(&mut self, rows: SeqRows, input: StageInput<'_>) {
        let id = rows.request_id;
        let _span = info_span!("stage", request_id = id, rows = rows.rows).entered();
        let (Some(stage), Some(seq)) = (&self.stage, self.seqs.get_mut(&id)) else {
            debug!(request_id = id, "chunk for an unknown request dropped");
            return;
        };
        if seq.cache.len() != rows.position as usize {
            let why = format!(
                "request {id} at position {} but node {} has {} cached",
                rows.position,
                self.cfg.me,
                seq.cache.len()
            );
            self.fail(id, why);
            return;
        }
        let t = Instant::now();
        let result = stage.forward(input, &mut seq.cache, LogitsFor::Last);
        tracing::trace!(us = t.elapsed().as_micros() as u64, "forward");
        self.cfg
            .metrics
            .stage_compute
            .observe(t.elapsed().as_secs_f64());
        let out = match result {
            Ok(o) => o,
            Err(e) => {
                let why = format!("node {}: {e}", self.cfg.me);
                self.fail(id, why);
                return;
            }
        };
        let msg = match (out, &self.next) {
            (StageOutput::Hidden(h), Some(next)) => {
                match hidden_message(&h, rows, self.cfg.dtype) {
                    Ok(m) => (next.clone(), m),
                    Err(e) => return self.fail(id, format!("node {}: {e}", self.cfg.me)),
                }
            }
            (StageOutput::Logits(l), None) => {
                if !rows.sample {
                    return;
                }
                let (sampler, history) = seq.sampler.as_mut().expect("last stage has a sampler");
                let logits = match l.squeeze(0).and_then(|l| l.to_vec1::<f32>()) {
                    Ok(v) => v,
                    Err(e) => return self.fail(id, format!("node {}: {e}", self.cfg.me)),
                };
                let token = sampler.sample(&logits, history);
                history.push(token);
                let entry = SampledToken {
                    request_id: id,
                    position: rows.position + rows.rows,
                    token,
                };
                (
                    seq.origin.clone(),
                    Message::Tokens(Tokens {
                        entries: vec![entry],
                    }),
                )
            }
            _ => return self.fail(id, "stage output does not match the plan".into()),
        };
        self.out.send(&msg.0, msg.1);
    }

    fn cancel(&mut self, id: u64) {
        self.seqs.remove(&id);
        if let Some(next) = &self.next {
            self.out.send(next, Message::Cancel { request_id: id });
        }
    }

    /// Ends a request here, tells its origin, and frees it downstream.
    fn fail(&mut self, id: u64, reason: String) {
        warn!(request_id = id, "{reason}");
        if let Some(seq) = self.seqs.get(&id) {
            let origin = seq.origin.clone();
            self.out.send(
                &origin,
                Message::Failed {
                    request_id: id,
                    reason,
                },
            );
        }
        self.cancel(id);
    }
}

fn hidden_message(h: &Tensor, rows: SeqRows, dtype: DType) -> candle_core::Result<Message> {
    let dim = h.dim(1)?;
    let values = h
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok(Message::Activations(Activations {
        batch: vec![rows],
        dim: dim as u32,
        dtype,
        payload: encode_payload(&values, dtype),
    }))
}

/// Activations as little-endian bytes of `dtype`.
pub fn encode_payload(values: &[f32], dtype: DType) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * dtype.size());
    match dtype {
        DType::F32 => values.iter().for_each(|v| out.extend(v.to_le_bytes())),
        DType::F16 => values
            .iter()
            .for_each(|v| out.extend(half::f16::from_f32(*v).to_le_bytes())),
        DType::BF16 => values
            .iter()
            .for_each(|v| out.extend(half::bf16::from_f32(*v).to_le_bytes())),
    }
    out
}

/// The inverse of [`encode_payload`]; `bytes` holds whole elements (checked
/// by the frame decoder).
pub fn decode_payload(bytes: &[u8], dtype: DType) -> Vec<f32> {
    match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        DType::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip() {
        let v = [1.5f32, -2.25, 1e4, 0.0];
        assert_eq!(
            decode_payload(&encode_payload(&v, DType::F32), DType::F32),
            v
        );
        assert_eq!(
            decode_payload(&encode_payload(&v, DType::F16), DType::F16),
            v
        );
        assert_eq!(
            decode_payload(&encode_payload(&v, DType::BF16), DType::BF16)[..2],
            v[..2]
        );
    }
}
