//! What keeps one member or one bad pass from hurting the rest: which
//! member may send which data-plane message for a request, and how the
//! worker recovers from a panicking pass.

use protocol::Message;

use engine::model::Stage;

use super::Worker;

impl Worker {
    /// KV bytes one position takes on `stage`: the planner's figure (f16 K
    /// and V per layer), so planner and worker budget alike.
    pub(super) fn kv_bytes_per_position(&self, stage: &Stage) -> u64 {
        let spec = sharding::ModelSpec::from_layout(&self.cfg.layout, 1, 2);
        spec.kv_bytes_per_token_layer * stage.layers().len() as u64
    }

    /// The stage's weights as the planner counted them when it placed the
    /// layers within this node's memory (with room for one full context).
    pub(super) fn planned_weight_bytes(&self, stage: &Stage) -> u64 {
        sharding::ModelSpec::from_layout(&self.cfg.layout, 0, 2).stage_memory(stage.layers())
    }

    /// Whether member `from` may send `msg` to this stage: a request is
    /// begun by its origin (first stage) or the previous stage, under an
    /// id not in use; prompt tokens come from the request's origin,
    /// activations from the previous stage, a cancel from either.
    pub(super) fn may_send(&self, from: &str, msg: &Message) -> Result<(), &'static str> {
        let prev = self.prev.as_deref();
        let origin_of = |id: &u64| self.seqs.get(id).map(|s| s.origin.as_str());
        let ok = match msg {
            Message::Begin(b) => {
                if self.seqs.contains_key(&b.request_id) {
                    return Err("a request id already in use");
                }
                match prev {
                    None => from == b.origin,
                    Some(p) => from == p,
                }
            }
            Message::Input(i) => prev.is_none() && origin_of(&i.request_id) == Some(from),
            Message::Activations(_) => prev == Some(from),
            Message::Cancel { request_id } => {
                prev == Some(from) || origin_of(request_id) == Some(from)
            }
            _ => true,
        };
        if ok {
            Ok(())
        } else {
            Err("not from the node that may send it for this request")
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
            self.out.send(
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
    static PASSES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = PASSES.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
    if std::env::var("SHOAL_FAULT_PANIC_PASS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        == Some(n)
    {
        panic!("fault injection: pass {n} panics");
    }
}

/// Test hook: `SHOAL_FAULT_LIE=tokens` makes this node, when a stage other
/// than the last, send the origin of every request it begins a token of
/// its own — a member lying about a request it does not own — to prove the
/// origin takes tokens only from the request's last stage.
pub(super) fn fault_lies() -> bool {
    std::env::var("SHOAL_FAULT_LIE").is_ok_and(|v| v == "tokens")
}
