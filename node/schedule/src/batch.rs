//! Continuous batching on a stage: which queued chunks run together in the
//! next forward pass. Pure decisions (no model, no sockets), so they are
//! tested on their own; a node's stage worker feeds the queue and
//! runs what [`Batcher::next_batch`] picks.
//!
//! Policy, in order:
//! - **Decode first.** Chunks of one row (a sequence's next token) all join
//!   the batch: they are cheap next to the weight reads they share, and a
//!   stream's token rate is what people watch.
//! - **Prompts in pieces.** Prompt chunks fill the remaining row budget
//!   ([`BATCH_ROWS_MAX`]), oldest first; a long one is cut so a 4k-token
//!   prompt does not stall every stream for seconds. Pieces never change
//!   the arithmetic: attention switches kernels at
//!   [`crate::TILED_ROWS_MIN`] rows, so a chunk of at least that
//!   many rows is only cut into pieces that are as long.
//! - **One chunk per sequence per pass**, in arrival order: a sequence's
//!   later chunk needs the cache its earlier one writes.
//! - **Micro-batches for the pipeline.** On the first stage of a pipeline of
//!   `n` stages, at most `⌈sequences / n⌉` sequences run together, so there
//!   are as many groups in flight as stages and every stage has work.
//! - **Groups stay together.** The next tokens of a batch come back to the
//!   first stage one message at a time; starting on the first arrival would
//!   split the group for good. When part of a group is back, the rest is
//!   awaited for up to [`REGROUP_WAIT`].
//! - **Small groups merge.** A decode step that could share a pass with a
//!   group still on its way (the micro-batch cap leaves room for both)
//!   waits for it up to [`REGROUP_WAIT`] after the stage's last pass: on
//!   one stage, a request that started alone would otherwise alternate
//!   with the others for good (1 + 3 sequences per pass instead of 4, a
//!   third slower).

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use protocol::SeqRows;

use crate::TILED_ROWS_MIN;

/// Rows (positions, summed over sequences) in one forward pass at most.
pub const BATCH_ROWS_MAX: usize = 256;

/// How long the first stage waits for the rest of a group once part of it
/// is back, or (merging) for a group on its way after its last pass: a
/// loopback round trip through the origin is ~0.1-0.5 ms.
pub const REGROUP_WAIT: Duration = Duration::from_millis(2);

/// A group still missing members this long after it ran is no longer
/// waited for by others (its members ended, failed, or their Cancel was
/// lost): merging is an optimisation and must not tax every later pass.
pub const GROUP_STALE: Duration = Duration::from_secs(1);

/// The new rows of one chunk of one sequence.
#[derive(Debug, Clone, PartialEq)]
pub enum Rows {
    /// Token ids (first stage).
    Tokens(Vec<u32>),
    /// Hidden states, `rows × dim` f32 (other stages).
    Hidden(Vec<f32>),
}

/// A queued chunk.
#[derive(Debug, Clone, PartialEq)]
pub struct Work {
    /// Request, position, row count, whether the last row is sampled.
    pub seq: SeqRows,
    /// The rows themselves.
    pub rows: Rows,
    /// Its proposals (`seq.draft` of them, its last input tokens), for the
    /// last stage to check its draws against (see
    /// `protocol::Activations::proposals`).
    pub proposals: Vec<u32>,
}

impl Work {
    /// Cuts the first `n` rows off (they never sample); `self` keeps the rest.
    fn split_front(&mut self, n: usize) -> Work {
        let total = self.seq.rows as usize;
        assert!(n > 0 && n < total, "split inside the chunk");
        let head = match &mut self.rows {
            Rows::Tokens(t) => Rows::Tokens(t.drain(..n).collect()),
            Rows::Hidden(h) => {
                let dim = h.len() / total;
                Rows::Hidden(h.drain(..n * dim).collect())
            }
        };
        let front = Work {
            seq: SeqRows {
                rows: n as u32,
                sample: false,
                draft: 0,
                ..self.seq
            },
            rows: head,
            proposals: Vec::new(),
        };
        self.seq.position += n as u32;
        self.seq.rows -= n as u32;
        front
    }
}

/// Sequences whose next chunks are expected back together.
#[derive(Debug)]
struct Group {
    members: HashSet<u64>,
    missing: HashSet<u64>,
    first_back: Option<Instant>,
    /// When it ran on this stage.
    ran: Instant,
}

/// The stage's queue of chunks and the groups it keeps together.
#[derive(Debug, Default)]
pub struct Batcher {
    queue: VecDeque<Work>,
    groups: Vec<Group>,
    /// When each queued decode step arrived.
    queued_at: HashMap<u64, Instant>,
    /// When the stage's last pass ended.
    last_pass: Option<Instant>,
    /// The micro-batch cap of the last regrouped pass (0: never merge).
    cap: usize,
}

/// What the worker should do next.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Nothing queued: wait for a message.
    Idle,
    /// Run [`Batcher::next_batch`] now.
    Run,
    /// Wait for more of a group until then (or for any message).
    WaitUntil(Instant),
}

/// Rows of a chunk of `rows` that fit in `room` without changing its
/// attention kernel; `None` when no piece fits.
fn piece(rows: usize, room: usize) -> Option<usize> {
    if rows <= room {
        Some(rows)
    } else if rows < TILED_ROWS_MIN {
        (room > 0).then_some(room)
    } else {
        let p = room.min(rows - TILED_ROWS_MIN);
        (p >= TILED_ROWS_MIN).then_some(p)
    }
}

impl Batcher {
    /// Queues a chunk; it counts as back for its group.
    pub fn push(&mut self, work: Work, now: Instant) {
        let id = work.seq.request_id;
        for g in &mut self.groups {
            if g.missing.remove(&id) {
                g.first_back.get_or_insert(now);
            }
        }
        self.groups.retain(|g| !g.missing.is_empty());
        if work.seq.rows == 1 {
            self.queued_at.insert(id, now);
        }
        self.queue.push_back(work);
    }

    /// Notes that the stage's pass ended: merge waits count from here.
    pub fn finished(&mut self, now: Instant) {
        self.last_pass = Some(now);
    }

    /// Drops every queued chunk of `id` and stops expecting it.
    pub fn cancel(&mut self, id: u64) {
        self.queue.retain(|w| w.seq.request_id != id);
        self.queued_at.remove(&id);
        for g in &mut self.groups {
            g.missing.remove(&id);
            g.members.remove(&id);
        }
        self.groups.retain(|g| !g.missing.is_empty());
    }

    /// Forgets everything (a new plan).
    pub fn clear(&mut self) {
        self.queue.clear();
        self.groups.clear();
        self.queued_at.clear();
    }

    /// Chunks queued.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Until when `id` waits at `now` for the rest of its group, when the
    /// group is partly back.
    fn held(&self, id: u64, now: Instant) -> Option<Instant> {
        self.groups
            .iter()
            .filter(|g| g.members.contains(&id) && !g.missing.contains(&id))
            .filter_map(|g| g.first_back.map(|t| t + REGROUP_WAIT))
            .filter(|&deadline| now < deadline)
            .min()
    }

    /// Until when `id` (a queued decode step) waits at `now` for a group on
    /// its way that fits in the same pass (see "Small groups merge"). Only
    /// [`Batcher::next`] asks: once a pass runs anyway, the step joins it.
    fn merging(&self, id: u64, now: Instant) -> Option<Instant> {
        let since = self.queued_at.get(&id)?;
        let deadline = self.last_pass.map_or(*since, |p| p.max(*since)) + REGROUP_WAIT;
        if now >= deadline {
            return None;
        }
        let ready = self.queued_at.len();
        self.groups
            .iter()
            .any(|g| {
                !g.members.contains(&id)
                    && now.duration_since(g.ran) < GROUP_STALE
                    && ready + g.missing.len() <= self.cap
            })
            .then_some(deadline)
    }

    /// Whether to run now, wait for a group, or idle.
    pub fn next(&self, now: Instant) -> Next {
        if self.queue.is_empty() {
            return Next::Idle;
        }
        let mut wait: Option<Instant> = None;
        for w in &self.queue {
            let id = w.seq.request_id;
            match self.held(id, now).or_else(|| self.merging(id, now)) {
                None => return Next::Run,
                Some(d) => wait = Some(wait.map_or(d, |x: Instant| x.min(d))),
            }
        }
        Next::WaitUntil(wait.expect("queue not empty"))
    }

    /// Takes the chunks of the next forward pass: at most `seqs_max`
    /// sequences and [`BATCH_ROWS_MAX`] rows, all of one kind (tokens or
    /// hidden states). A sampled sequence's next chunk is then expected
    /// back with the others of this batch when `regroup` (first stage).
    pub fn next_batch(&mut self, seqs_max: usize, regroup: bool, now: Instant) -> Vec<Work> {
        let seqs_max = seqs_max.max(1);
        let mut taken: HashSet<u64> = HashSet::new();
        let mut picked: Vec<usize> = Vec::new();
        let tokens = match self
            .queue
            .iter()
            .find(|w| self.held(w.seq.request_id, now).is_none())
        {
            Some(w) => matches!(w.rows, Rows::Tokens(_)),
            None => return Vec::new(),
        };
        let eligible = |w: &Work, taken: &HashSet<u64>| {
            matches!(w.rows, Rows::Tokens(_)) == tokens
                && !taken.contains(&w.seq.request_id)
                && self.held(w.seq.request_id, now).is_none()
        };
        // Decode steps first: a sequence's one-row chunk only when no
        // earlier chunk of it is queued (a replayed request queues its
        // prompt, then the tokens generated before, in pieces).
        let mut seen: HashSet<u64> = HashSet::new();
        for (i, w) in self.queue.iter().enumerate() {
            if picked.len() >= seqs_max {
                break;
            }
            let first = seen.insert(w.seq.request_id);
            if first && w.seq.rows == 1 && eligible(w, &taken) {
                taken.insert(w.seq.request_id);
                picked.push(i);
            }
        }
        // Then prompt chunks, in pieces, in the rows left.
        let mut rows = picked.len();
        let mut cuts: Vec<(usize, usize)> = Vec::new();
        for (i, w) in self.queue.iter().enumerate() {
            if picked.len() >= seqs_max || rows >= BATCH_ROWS_MAX {
                break;
            }
            if w.seq.rows == 1 || !eligible(w, &taken) {
                continue;
            }
            // Later chunks of this sequence must wait for this one either way.
            taken.insert(w.seq.request_id);
            let whole = w.seq.rows as usize;
            if let Some(p) = piece(whole, BATCH_ROWS_MAX - rows) {
                // A chunk with proposals runs whole (its logits are read
                // per position) or waits for the next pass.
                if w.seq.draft > 0 && p < whole {
                    continue;
                }
                rows += p;
                picked.push(i);
                cuts.push((i, p));
            }
        }
        picked.sort_unstable();
        let mut batch = Vec::with_capacity(picked.len());
        for &i in picked.iter().rev() {
            let cut = cuts.iter().find(|(j, _)| *j == i).map(|&(_, p)| p);
            let w = &mut self.queue[i];
            match cut {
                Some(p) if p < w.seq.rows as usize => batch.push(w.split_front(p)),
                _ => batch.push(self.queue.remove(i).expect("picked index")),
            }
        }
        batch.reverse();
        for w in &batch {
            if w.seq.rows == 1 {
                self.queued_at.remove(&w.seq.request_id);
            }
        }
        if regroup {
            self.cap = seqs_max;
            let ids: HashSet<u64> = batch
                .iter()
                .filter(|w| w.seq.sample)
                .map(|w| w.seq.request_id)
                .collect();
            for g in &mut self.groups {
                g.missing.retain(|id| !ids.contains(id));
                g.members.retain(|id| !ids.contains(id));
            }
            self.groups.retain(|g| !g.missing.is_empty());
            if !ids.is_empty() {
                self.groups.push(Group {
                    members: ids.clone(),
                    missing: ids,
                    first_back: None,
                    ran: now,
                });
            }
        }
        batch
    }
}

#[cfg(test)]
mod tests;
