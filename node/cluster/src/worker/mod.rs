//! The stage worker: one thread that owns this node's layers and the KV
//! caches of the requests passing through, and runs every forward pass.
//!
//! Messages arrive in order per link (Begin, then Input or Activations
//! chunks, then Cancel), so a request's state machine is simple: Begin
//! allocates, each chunk extends the cache, Cancel frees. Chunks queue in a
//! [`Batcher`], which decides what runs together (continuous batching: new
//! requests join between passes, long prompts go in pieces); one forward
//! pass then runs every chosen sequence at once. The last stage also owns
//! each request's sampler and sends the tokens to their origins.

use std::collections::HashMap;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use protocol::{Activations, DType, Message, RequestError, SeqRows};
use sharding::{GgufFile, ModelLayout};
use tokio::sync::mpsc::{self, error::TryRecvError};
use tracing::{debug, info, info_span, warn};

use crate::dataplane::short;

use engine::model::{LoadOptions, Stage, StageOutput};
use engine::KvCache;
use schedule::{micro_batch_cap, Batcher, Next, Rows, Work, SEQUENCES_MAX};

/// Messages the worker queue holds: backpressure reaches the QUIC stream
/// (and the previous stage) when this node falls behind.
pub const WORKER_QUEUE: usize = 64;

/// Chunks the batcher holds before the worker stops draining its channel
/// (so backpressure still reaches the senders).
const PENDING_MAX: usize = 2 * SEQUENCES_MAX;

/// How often a worker waiting for the rest of a group looks for it.
const REGROUP_POLL: Duration = Duration::from_micros(50);

/// Why this node's stage could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// Its layers could not be fetched from members.
    #[error("weights: {0}")]
    Weights(#[from] crate::weights::FetchError),
    /// The model file could not be read or the stage built.
    #[error(transparent)]
    Engine(#[from] engine::LoadError),
}

impl From<sharding::GgufError> for LoadError {
    fn from(e: sharding::GgufError) -> LoadError {
        LoadError::Engine(e.into())
    }
}

/// Where a worker's output goes (the data plane; a test double in tests).
pub trait Outbox: Send + Sync {
    /// Sends `msg` to node `to`, waiting while its link is full.
    fn send(&self, to: &str, msg: Message);
    /// Sends `msg` (tokens or a failure) to an origin without waiting:
    /// false when its link is full or down.
    fn send_now(&self, to: &str, msg: Message) -> bool;
    /// Member `node` sent this stage what no honest node sends.
    fn caught(&self, node: &str, why: String);
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
        /// The previous stage's node id (none: this is the first stage).
        prev: Option<String>,
        /// Stages in the plan (the first stage forms one micro-batch per stage).
        stages: usize,
    },
    /// No plan in force: drop requests, keep the layers.
    Pause,
    /// A data-plane message for this stage, from member `from`.
    Data {
        /// The member that sent it (its certificate said so).
        from: String,
        /// The message.
        msg: Message,
    },
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
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Gets this node's layers from peers when it lacks them.
    pub fetcher: Arc<crate::weights::Fetcher>,
    /// Memory this node may use for weights and KV caches (`--max-memory`,
    /// the figure the planner placed layers by): the stage's weights come
    /// off it, the rest is the KV budget its requests share.
    pub memory_bytes: u64,
    /// The model's tokenizer and template, shared with the origin (loaded
    /// by whichever needs it first): the last stage's grammars are built
    /// from its vocabulary once per node.
    pub text: Arc<tokio::sync::OnceCell<Arc<engine::text::TextModel>>>,
}

struct Sequence {
    cache: KvCache,
    /// The KV bytes held for it at full context (see `Worker::kv_budget`).
    kv_bytes: u64,
    origin: String,
    /// The member that began it here (its origin or the previous stage):
    /// the only one whose activations it takes.
    from: String,
    /// Last stage only: how its tokens are drawn.
    pick: Option<Pick>,
    /// After a chunk with proposals ran: the lowest position the next
    /// chunk may start at (dropping the rejected proposals' cache).
    rollback_floor: Option<usize>,
    /// Last stage: the proposals of the chunk it ran last and the position
    /// of the first, checked against its draws.
    proposals: (usize, Vec<u32>),
    /// Last stage: a proposal since the last chunk with a known token did
    /// not stand, so chunks of proposals only are void until the next one
    /// (the origin, applying the same rule, expects nothing from them).
    void: bool,
}

/// The running worker's state.
pub struct Worker {
    cfg: WorkerConfig,
    out: Arc<dyn Outbox>,
    epoch: u64,
    stage: Option<Stage>,
    next: Option<String>,
    prev: Option<String>,
    stages: usize,
    seqs: HashMap<u64, Sequence>,
    batcher: Batcher,
    /// A pass ran since the heap was last handed back (see `turn`).
    heap_dirty: bool,
    /// The requests of the pass running (their sequences are out of
    /// `seqs` meanwhile): failed to their origins if the pass panics.
    in_pass: Vec<(u64, String)>,
    /// Data messages held back behind a `Begin` of a plan this node has
    /// not heard of yet (see `admit.rs`), and since when.
    parked: std::collections::VecDeque<(String, Message)>,
    parked_since: Option<Instant>,
    /// KV bytes of one position on the loaded stage (see `kv_budget`),
    /// for the filled-KV figure each turn reports.
    kv_per_position: u64,
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
        prev: None,
        stages: 1,
        seqs: HashMap::new(),
        batcher: Batcher::default(),
        heap_dirty: false,
        in_pass: Vec::new(),
        parked: Default::default(),
        parked_since: None,
        kv_per_position: 0,
    };
    std::thread::Builder::new()
        .name("shoal-stage".into())
        .spawn(move || loop {
            // A panic in a pass (a bug, a model the engine mishandles)
            // must not leave the node in the plan with no worker: every
            // request would wait out its token timeout. Its requests fail
            // at once and the worker goes on with the next.
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| w.turn(&mut rx))) {
                Ok(true) => {}
                Ok(false) => break,
                Err(panic) => w.recover(panic_text(&*panic)),
            }
        })
        .expect("spawn stage worker");
    tx
}

impl Worker {
    /// Waits for work as the batcher says, takes every message already
    /// queued, and runs one pass if one is due. `false` once the node is gone.
    fn turn(&mut self, rx: &mut mpsc::Receiver<WorkerMsg>) -> bool {
        match self.batcher.next(Instant::now()) {
            Next::Idle => {
                // No request holds a cache here any more: hand the heap the
                // passes freed back to the OS (the process keeps freed
                // buffers while it works, see `engine::init_process`), so an
                // idle stage holds its share and little more. Not between
                // the tokens of a request: that would walk the heap per token.
                if self.heap_dirty && self.seqs.is_empty() {
                    engine::local::release_freed_heap();
                    self.heap_dirty = false;
                }
                if self.parked.is_empty() {
                    match rx.blocking_recv() {
                        Some(msg) => self.handle(msg),
                        None => return false,
                    }
                } else {
                    match rx.try_recv() {
                        Ok(msg) => self.handle(msg),
                        Err(TryRecvError::Disconnected) => return false,
                        Err(TryRecvError::Empty) => std::thread::sleep(REGROUP_POLL),
                    }
                    self.unpark_if_late();
                }
            }
            Next::WaitUntil(deadline) => loop {
                match rx.try_recv() {
                    Ok(msg) => {
                        self.handle(msg);
                        break;
                    }
                    Err(TryRecvError::Disconnected) => return false,
                    Err(TryRecvError::Empty) if Instant::now() >= deadline => break,
                    Err(TryRecvError::Empty) => std::thread::sleep(REGROUP_POLL),
                }
            },
            Next::Run => {}
        }
        while self.batcher.len() < PENDING_MAX {
            match rx.try_recv() {
                Ok(msg) => self.handle(msg),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return false,
            }
        }
        if self.batcher.next(Instant::now()) == Next::Run {
            self.step();
        }
        self.cfg
            .live
            .store(self.seqs.len(), std::sync::atomic::Ordering::Relaxed);
        self.cfg.metrics.kv_sequences.set(self.seqs.len() as i64);
        let positions: u64 = self.seqs.values().map(|s| s.cache.len() as u64).sum();
        let kv = positions * self.kv_per_position;
        self.cfg
            .metrics
            .kv_bytes
            .store(kv, std::sync::atomic::Ordering::Relaxed);
        true
    }

    fn handle(&mut self, msg: WorkerMsg) {
        match msg {
            WorkerMsg::Reconfigure {
                epoch,
                layers,
                next,
                prev,
                stages,
            } => {
                self.prev = prev;
                self.reconfigure(epoch, layers, next, stages);
                self.unpark();
            }
            WorkerMsg::Pause => {
                self.epoch = 0;
                self.seqs.clear();
                self.batcher.clear();
            }
            WorkerMsg::Data { from, msg } => {
                if self.park(&from, &msg) {
                    return;
                }
                match self.may_send(&from, &msg) {
                    Verdict::Take => {}
                    Verdict::Refuse(why) => {
                        warn!(from = %short(&from), "data-plane message refused: {why}");
                        return;
                    }
                    Verdict::Lie(why) => {
                        self.fail_lied_about(&from, &msg);
                        self.out.caught(&from, why);
                        return;
                    }
                }
                match msg {
                    Message::Begin(b) => self.begin(b, from),
                    Message::Input(i) => {
                        let seq = SeqRows {
                            request_id: i.request_id,
                            position: i.position,
                            rows: i.tokens.len() as u32,
                            sample: i.sample,
                            draft: i.draft,
                        };
                        let proposals = i.tokens[i.tokens.len() - i.draft as usize..].to_vec();
                        self.queue(seq, Rows::Tokens(i.tokens), proposals);
                    }
                    Message::Activations(a) => self.activations(a),
                    Message::Cancel { request_id } => self.cancel(request_id),
                    other => warn!(?other, "stage worker got a message it does not handle"),
                }
            }
        }
    }

    fn reconfigure(
        &mut self,
        epoch: u64,
        layers: Option<Range<usize>>,
        next: Option<String>,
        stages: usize,
    ) {
        self.epoch = epoch;
        self.next = next;
        self.stages = stages.max(1);
        // Requests of the old plan cannot continue: their origins fail them.
        self.seqs.clear();
        self.batcher.clear();
        let same = self.stage.as_ref().map(|s| s.layers()) == layers;
        if same {
            return;
        }
        self.stage = None;
        engine::local::release_freed_heap();
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
                self.kv_per_position = self.kv_budget(&stage).0;
                self.stage = Some(stage);
            }
            Err(e) => warn!(layers = ?layers, "cannot load stage: {e}"),
        }
    }

    fn load(&self, layers: Range<usize>) -> Result<Stage, LoadError> {
        // Requests for this plan wait in the queue meanwhile.
        self.cfg.fetcher.ensure_layers(layers.clone())?;
        let gguf = GgufFile::open(&self.cfg.model)?;
        let stage = Stage::load(&gguf, &self.cfg.layout, layers, &self.cfg.load)?;
        stage.prefault(&mut |_, _| {});
        Ok(stage)
    }

    /// Queues a chunk of a known request.
    fn queue(&mut self, seq: SeqRows, rows: Rows, proposals: Vec<u32>) {
        if !self.seqs.contains_key(&seq.request_id) {
            debug!(
                request_id = seq.request_id,
                "chunk for an unknown request dropped"
            );
            return;
        }
        let work = Work {
            seq,
            rows,
            proposals,
        };
        self.batcher.push(work, Instant::now());
    }

    fn activations(&mut self, a: Activations) {
        let mut offset = 0usize;
        let mut proposals = a.proposals.into_iter();
        for seq in a.batch {
            let n = seq.rows as usize * a.dim as usize;
            let bytes = n * a.dtype.size();
            let values = decode_payload(&a.payload[offset..offset + bytes], a.dtype);
            offset += bytes;
            let mine = proposals.by_ref().take(seq.draft as usize).collect();
            self.queue(seq, Rows::Hidden(values), mine);
        }
    }

    /// Runs the batcher's next pass and sends its results on.
    fn step(&mut self) {
        self.heap_dirty = true;
        let Some(first) = self.stage.as_ref().map(|s| s.is_first()) else {
            self.batcher.clear();
            return;
        };
        // One micro-batch per stage keeps a pipeline's stages all busy.
        let seqs_max = micro_batch_cap(first, self.stages, self.seqs.len());
        let last = self.next.is_none();
        let batch = self.batcher.next_batch(seqs_max, first, Instant::now());
        let mut ready: Vec<(Work, Sequence)> = Vec::with_capacity(batch.len());
        let mut failed: Vec<(u64, RequestError)> = Vec::new();
        for work in batch {
            let id = work.seq.request_id;
            let Some(mut seq) = self.seqs.remove(&id) else {
                continue;
            };
            let (pos, rows) = (work.seq.position as usize, work.seq.rows as usize);
            if !speculate::prepare(&mut seq, &work, last) {
                // After a proposal that did not stand: nothing to run.
                self.seqs.insert(id, seq);
                continue;
            }
            if seq.cache.len() != pos {
                let why = format!("request at position {pos}, {} cached", seq.cache.len());
                failed.push((id, self.stage_error(why)));
                self.seqs.insert(id, seq);
            } else if pos + rows > seq.cache.max_len() {
                let full = RequestError::ContextFull {
                    needed: (pos + rows) as u32,
                    context: seq.cache.max_len() as u32,
                };
                self.seqs.insert(id, seq);
                failed.push((id, full));
            } else {
                ready.push((work, seq));
            }
        }
        for (id, why) in failed {
            self.fail(id, why);
        }
        if ready.is_empty() {
            return;
        }
        let rows_total: usize = ready.iter().map(|(w, _)| w.seq.rows as usize).sum();
        let _span = info_span!("stage", sequences = ready.len(), rows = rows_total).entered();
        let t = Instant::now();
        let stage = self.stage.as_ref().expect("checked above");
        self.in_pass = ready
            .iter()
            .map(|(w, s)| (w.seq.request_id, s.origin.clone()))
            .collect();
        fault_panics();
        let result = run_batch(stage, &mut ready);
        self.in_pass.clear();
        tracing::trace!(us = t.elapsed().as_micros() as u64, "forward");
        self.cfg
            .metrics
            .stage_compute
            .observe(t.elapsed().as_secs_f64());
        self.cfg.metrics.busy_us.fetch_add(
            t.elapsed().as_micros() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        self.cfg.metrics.batch_sequences.observe(ready.len() as f64);
        self.batcher.finished(Instant::now());
        let order: Vec<SeqRows> = ready.iter().map(|(w, _)| w.seq).collect();
        let mut proposals = Vec::new();
        for (work, seq) in ready {
            self.seqs.insert(work.seq.request_id, seq);
            proposals.push(work.proposals);
        }
        match result {
            Ok(out) => self.send_output(out, order, proposals),
            Err(engine::PassError::ContextFull { needed, max }) => {
                let full = RequestError::ContextFull {
                    needed: needed as u32,
                    context: max as u32,
                };
                for s in &order {
                    self.fail(s.request_id, full.clone());
                }
            }
            Err(e) => self.fail_all(&order, &e.to_string()),
        }
    }

    /// Hidden states go on to the next stage in one message; sampled
    /// tokens go to their origins, one message per origin.
    fn send_output(&mut self, out: StageOutput, order: Vec<SeqRows>, proposals: Vec<Vec<u32>>) {
        match (out, self.next.clone()) {
            (StageOutput::Hidden(h), Some(next)) => {
                match hidden_message(&h, order.clone(), self.cfg.dtype) {
                    Ok((m, unsendable)) => {
                        // The next stage would rightly take them for a lie.
                        for id in unsendable {
                            let why = format!(
                                "its hidden state is not finite in {:?} (the model overflows)",
                                self.cfg.dtype
                            );
                            self.fail(id, self.stage_error(why));
                        }
                        if let Some(mut m) = m {
                            speculate::attach(&mut m, &order, proposals);
                            lie_in_activations(&mut m);
                            self.out.send(&next, m);
                        }
                    }
                    Err(e) => {
                        self.fail_all(&order, &e.to_string());
                    }
                }
            }
            (StageOutput::Logits(l), None) => self.send_tokens(l, &order),
            _ => {
                self.fail_all(&order, "stage output does not match the plan");
            }
        }
    }

    fn cancel(&mut self, id: u64) {
        self.seqs.remove(&id);
        self.batcher.cancel(id);
        if let Some(next) = &self.next {
            self.out.send(next, Message::Cancel { request_id: id });
        }
    }

    /// A failure of this stage's own work.
    fn stage_error(&self, why: String) -> RequestError {
        RequestError::Stage {
            node: short(&self.cfg.me).to_string(),
            why,
        }
    }

    /// Fails every request of a pass that went wrong as a whole.
    fn fail_all(&mut self, batch: &[SeqRows], why: &str) {
        for s in batch {
            self.fail(s.request_id, self.stage_error(why.to_string()));
        }
    }

    /// Ends a request here, tells its origin, and frees it downstream.
    fn fail(&mut self, id: u64, error: RequestError) {
        warn!(request_id = id, "{error}");
        if let Some(seq) = self.seqs.get(&id) {
            let origin = seq.origin.clone();
            let _ = self.out.send_now(
                &origin,
                Message::Failed {
                    request_id: id,
                    error,
                },
            );
        }
        self.cancel(id);
    }
}

mod admit;
mod guard;
mod pass;
mod pick;
mod speculate;
use guard::{fault_panics, lie_in_activations, panic_text, Verdict};
pub use pass::{decode_payload, encode_payload};
use pass::{hidden_message, run_batch};
use pick::Pick;

#[cfg(test)]
mod tests;
