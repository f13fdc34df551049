//! What keeps one member or one bad pass from hurting the rest: which
//! member may send which data-plane message for a request, and how the
//! worker recovers from a panicking pass.

use protocol::{Begin, Message, SampledToken, Tokens};
use tracing::warn;

use crate::dataplane::short;

use engine::model::Stage;

use super::{Outbox, Worker};

/// What the worker does with a data-plane message.
#[derive(Debug, PartialEq)]
pub(super) enum Verdict {
    /// Handle it.
    Take,
    /// Drop it: a plan change in flight can explain it.
    Refuse(&'static str),
    /// Drop it and report the sender: no honest node sends it.
    Lie(String),
}

impl Worker {
    /// For `stage`: the KV bytes of one position, and the KV bytes its
    /// requests may hold together (`--max-memory` less the stage's weights),
    /// both as the planner counts them (f16 K and V per layer; it placed
    /// the layers with room for one full context), from one model spec.
    pub(super) fn kv_budget(&self, stage: &Stage) -> (u64, u64) {
        // With a context of 0 a stage's memory is its weights alone.
        let spec = sharding::ModelSpec::from_layout(&self.cfg.layout, 0, 2);
        let per_position = spec.kv_bytes_per_token_layer * stage.layers().len() as u64;
        let weights = spec.stage_memory(stage.layers());
        (per_position, self.cfg.memory_bytes.saturating_sub(weights))
    }

    /// Whether member `from` may send `msg` to this stage. A request is
    /// begun by its origin (first stage) or the previous stage, under an
    /// id not in use; its prompt tokens come from its origin, its
    /// activations from the member that began it here, a cancel from
    /// either. What a plan change in flight can explain (a `Begin` from a
    /// stage that is not, or no longer, the previous one) is refused;
    /// what no honest node sends is a lie (request ids are random: only
    /// nodes the request passed through know one).
    pub(super) fn may_send(&self, from: &str, msg: &Message) -> Verdict {
        let prev = self.prev.as_deref();
        let seq = |id: &u64| self.seqs.get(id);
        match msg {
            Message::Begin(b) => {
                if self.seqs.contains_key(&b.request_id) {
                    return Verdict::Lie(format!("began request {}, already in use", b.request_id));
                }
                let ok = match prev {
                    None => from == b.origin,
                    Some(p) => from == p,
                };
                if !ok {
                    return Verdict::Refuse(
                        "a request begun by a node that is not the previous stage",
                    );
                }
            }
            Message::Input(i) => {
                if let Some(s) = seq(&i.request_id) {
                    if s.origin != from {
                        return Verdict::Lie(format!(
                            "tokens for request {}, not its origin",
                            i.request_id
                        ));
                    }
                }
            }
            Message::Activations(a) => {
                if a.batch
                    .iter()
                    .any(|r| seq(&r.request_id).is_some_and(|s| s.from != from))
                {
                    return Verdict::Lie("activations for a request it did not begin here".into());
                }
                let dim = self.cfg.layout.config.dim;
                if a.dim as usize != dim {
                    return Verdict::Lie(format!(
                        "activations {} wide, the model's are {dim}",
                        a.dim
                    ));
                }
                if !super::pass::finite_payload(&a.payload, a.dtype) {
                    return Verdict::Lie("activations that are not finite".into());
                }
            }
            Message::Cancel { request_id } => {
                if let Some(s) = seq(request_id) {
                    if s.from != from && s.origin != from {
                        return Verdict::Lie(format!(
                            "a cancel of request {request_id}, not its own"
                        ));
                    }
                }
            }
            _ => {}
        }
        Verdict::Take
    }

    /// After a lie from `from`: the requests it began here that the lie
    /// was about (activations it sent for them that cannot be used) fail.
    pub(super) fn fail_lied_about(&mut self, from: &str, msg: &Message) {
        let Message::Activations(a) = msg else {
            return;
        };
        for r in &a.batch {
            if self.seqs.get(&r.request_id).is_some_and(|s| s.from == from) {
                let why = format!(
                    "the previous stage ({}) sent unusable activations",
                    short(from)
                );
                self.fail(r.request_id, self.stage_error(why));
            }
        }
    }

    /// After a panic: every request here fails (its state may be half
    /// updated) and the worker starts clean with the same layers.
    pub(super) fn recover(&mut self, why: String) {
        tracing::error!("stage worker panicked: {why}; its requests fail, the worker carries on");
        let error = self.stage_error(format!("the stage worker crashed ({why})"));
        let mut ended: Vec<(u64, String)> = std::mem::take(&mut self.in_pass);
        ended.extend(self.seqs.iter().map(|(id, s)| (*id, s.origin.clone())));
        ended.sort();
        ended.dedup();
        for (id, origin) in ended {
            let _ = self.out.send_now(
                &origin,
                Message::Failed {
                    request_id: id,
                    error: error.clone(),
                },
            );
            if let Some(next) = &self.next {
                self.out.send(next, Message::Cancel { request_id: id });
            }
        }
        self.seqs.clear();
        self.batcher.clear();
    }
}

/// A panic's message, for the log and the requests it failed.
pub(super) fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    let text = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into());
    text.chars().take(300).collect()
}

/// Test hook: `SHOAL_FAULT_PANIC_PASS=<n>` makes the n-th forward pass of
/// this node panic, once — to prove a crashed pass fails its requests at
/// once and the node goes on serving.
pub(super) fn fault_panics() {
    // Read once: this runs before every forward pass.
    static AT: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    let Some(at) = *AT.get_or_init(|| {
        std::env::var("SHOAL_FAULT_PANIC_PASS")
            .ok()
            .and_then(|v| v.parse().ok())
    }) else {
        return;
    };
    static PASSES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = PASSES.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
    if n == at {
        panic!("fault injection: pass {n} panics");
    }
}

/// Fault injection (see `crate::fault`): what a lying stage sends after
/// it forwarded a request's `Begin` to `next`.
pub(super) fn lie_after_begin(out: &dyn Outbox, me: &str, next: &str, b: Begin) {
    let lies = crate::fault::lies();
    if lies.tokens {
        warn!("fault injection: a token for a request this stage does not finish");
        let lie = SampledToken {
            request_id: b.request_id,
            position: b.prompt.len() as u32,
            token: 0,
        };
        out.send(
            &b.origin,
            Message::Tokens(Tokens {
                entries: vec![lie],
                logprobs: Vec::new(),
            }),
        );
    }
    if lies.hijack {
        warn!("fault injection: a second Begin under a request's id");
        let origin = me.to_string();
        out.send(next, Message::Begin(Begin { origin, ..b }));
    }
}

/// Fault injection (see `crate::fault`): activations made wrong on their way out.
pub(super) fn lie_in_activations(m: &mut Message) {
    let lies = crate::fault::lies();
    let Message::Activations(a) = m else {
        return;
    };
    if lies.nan {
        warn!("fault injection: NaN activations");
        let nan = super::encode_payload(&[f32::NAN], a.dtype);
        a.payload[..nan.len()].copy_from_slice(&nan);
    }
    if lies.dims {
        warn!("fault injection: activations one element too wide");
        let rows: usize = a.batch.iter().map(|r| r.rows as usize).sum();
        a.dim += 1;
        a.payload.resize(a.payload.len() + rows * a.dtype.size(), 0);
    }
}
