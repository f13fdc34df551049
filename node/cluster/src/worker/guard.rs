//! What keeps one member or one bad pass from hurting the rest: which
//! member may send which data-plane message for a request, and how the
//! worker recovers from a panicking pass.

use protocol::Message;

use engine::model::Stage;

use super::Worker;

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

/// Test hook: `SHOAL_FAULT_LIE=tokens` makes this node, when a stage other
/// than the last, send the origin of every request it begins a token of
/// its own — a member lying about a request it does not own — to prove the
/// origin takes tokens only from the request's last stage.
pub(super) fn fault_lies() -> bool {
    static LIES: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *LIES.get_or_init(|| std::env::var("SHOAL_FAULT_LIE").is_ok_and(|v| v == "tokens"))
}
