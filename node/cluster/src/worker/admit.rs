//! Admission of a request at this stage: its plan, a slot, room for its
//! KV cache; and requests of a plan this node has not heard of yet.

use std::time::{Duration, Instant};

use protocol::{Begin, Message, RequestError};
use tracing::debug;

use schedule::SEQUENCES_MAX;

use super::guard::lie_after_begin;
use super::{Sequence, Worker, WorkerMsg};
use crate::dataplane::short;

/// Longest a `Begin` of a newer plan waits for that plan to reach this
/// node (it travels on the control plane, the request on the data plane:
/// a request replayed on a new plan can come first).
const PARK_WAIT: Duration = Duration::from_secs(3);

/// Most messages held back meanwhile.
const PARKED_MAX: usize = 1024;

impl Worker {
    /// Holds `msg` back when it is a `Begin` of a plan newer than this
    /// node's, or when messages are held already (they keep their order);
    /// true when held.
    pub(super) fn park(&mut self, from: &str, msg: &Message) -> bool {
        self.unpark_if_late();
        let newer = matches!(msg, Message::Begin(b) if b.epoch > self.epoch);
        if !newer && self.parked.is_empty() {
            return false;
        }
        if self.parked.len() >= PARKED_MAX {
            return false;
        }
        if self.parked.is_empty() {
            self.parked_since = Some(Instant::now());
        }
        self.parked.push_back((from.to_string(), msg.clone()));
        true
    }

    /// Handles the held messages (after a new plan, or when they waited
    /// too long: a `Begin` of a plan that never came is then refused).
    pub(super) fn unpark(&mut self) {
        self.parked_since = None;
        let held = std::mem::take(&mut self.parked);
        for (from, msg) in held {
            self.handle(WorkerMsg::Data { from, msg });
        }
    }

    /// Once the oldest held message waited [`PARK_WAIT`]: the `Begin`s of
    /// the plan that did not come are refused (their origins replay them
    /// under the plan in force), everything else is handled.
    pub(super) fn unpark_if_late(&mut self) {
        if self.parked_since.is_none_or(|t| t.elapsed() <= PARK_WAIT) {
            return;
        }
        debug!(
            held = self.parked.len(),
            "a newer plan did not come: refusing its requests"
        );
        self.parked_since = None;
        let held = std::mem::take(&mut self.parked);
        let mut refused = std::collections::HashSet::new();
        for (from, msg) in held {
            match msg {
                Message::Begin(b) if b.epoch > self.epoch => {
                    refused.insert(b.request_id);
                    let failed = Message::Failed {
                        request_id: b.request_id,
                        error: RequestError::Replanned,
                    };
                    let _ = self.out.send_now(&b.origin, failed);
                }
                Message::Input(i) if refused.contains(&i.request_id) => {}
                msg => self.handle(WorkerMsg::Data { from, msg }),
            }
        }
    }

    pub(super) fn begin(&mut self, b: Begin, from: String) {
        let fail = |error: RequestError| Message::Failed {
            request_id: b.request_id,
            error,
        };
        let Some(stage) = &self.stage else {
            let why = "holds no layers (its stage did not load)".into();
            let _ = self.out.send_now(&b.origin, fail(self.stage_error(why)));
            return;
        };
        if b.epoch != self.epoch {
            debug!(
                request_id = b.request_id,
                "request for epoch {} on epoch {}", b.epoch, self.epoch
            );
            let _ = self.out.send_now(&b.origin, fail(RequestError::Replanned));
            return;
        }
        if self.seqs.len() >= SEQUENCES_MAX && !self.seqs.contains_key(&b.request_id) {
            let full = RequestError::StageFull {
                node: short(&self.cfg.me).to_string(),
                max: SEQUENCES_MAX as u32,
            };
            let _ = self.out.send_now(&b.origin, fail(full));
            return;
        }
        // The cache may grow to the request's whole context: that much is
        // held for it from the start, so the stage never outgrows its
        // memory whatever the requests' lengths.
        let context = (b.context as usize).min(stage.max_context()) as u64;
        let (per_position, budget) = self.kv_budget(stage);
        let kv_bytes = context * per_position;
        let held: u64 = self.seqs.values().map(|s| s.kv_bytes).sum();
        if held + kv_bytes > budget && !self.seqs.contains_key(&b.request_id) {
            debug!(
                request_id = b.request_id,
                held, kv_bytes, budget, "no room for the request's KV cache"
            );
            let full = RequestError::StageMemory {
                node: short(&self.cfg.me).to_string(),
                mib: kv_bytes.div_ceil(1 << 20) as u32,
            };
            let _ = self.out.send_now(&b.origin, fail(full));
            return;
        }
        let last = stage.is_last();
        let new_cache = stage.new_cache(b.context as usize);
        let pick = match last.then(|| self.pick_for(&b)).transpose() {
            Ok(p) => p,
            Err(e) => {
                let _ = self.out.send_now(&b.origin, fail(e));
                return;
            }
        };
        self.seqs.insert(
            b.request_id,
            Sequence {
                cache: new_cache,
                kv_bytes,
                origin: b.origin.clone(),
                from,
                pick,
                rollback_floor: None,
                proposals: (0, Vec::new()),
                void: false,
            },
        );
        if let Some(next) = &self.next {
            self.out.send(next, Message::Begin(b.clone()));
            lie_after_begin(&*self.out, &self.cfg.me, next, b);
        }
    }
}
