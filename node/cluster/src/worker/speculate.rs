//! The last stage's side of proposals in flight (see `schedule::flight`):
//! which proposals stood, and which chunks of proposals only are void, by
//! the rule the origin applies to the same draws, so neither waits for
//! the other.

use protocol::{Message, SeqRows};
use schedule::Work;

use super::Sequence;

/// Readies `seq` for `work` (`last`: at the last stage); false when the
/// chunk is void there (see [`void`]) and is not to run.
pub(super) fn prepare(seq: &mut Sequence, work: &Work, last: bool) -> bool {
    let (pos, rows, draft) = (
        work.seq.position as usize,
        work.seq.rows as usize,
        work.seq.draft as usize,
    );
    // A chunk may start inside the proposals of the ones before (those
    // rejected); their cache goes.
    if seq.rollback_floor.is_some_and(|f| f <= pos) && pos < seq.cache.len() {
        seq.cache.truncate(pos);
    }
    if last && void(seq, work) {
        seq.void = true;
        return false;
    }
    let known = pos + rows - draft;
    // A chunk of proposals only continues the one before it: the known
    // tokens end where they did, and the sampler's history runs on through
    // that chunk's draws (which are its tokens exactly when it stands).
    if draft < rows {
        seq.void = false;
        seq.rollback_floor = (draft > 0).then_some(known);
        // The sampler's history ends at a sampled chunk's known tokens (a
        // prompt's earlier chunks leave it alone: it holds the whole
        // prompt from the Begin).
        if let (Some(p), true) = (&mut seq.pick, work.seq.sample) {
            p.keep_history(known);
        }
    }
    if last && draft > 0 {
        seq.proposals = (known, work.proposals.clone());
    }
    true
}

/// Whether the last stage skips `work`: a chunk of proposals only whose
/// first proposal is not the token drawn at its position, or one after a
/// proposal that did not stand. Its origin expects no draws from it.
fn void(seq: &Sequence, work: &Work) -> bool {
    if work.seq.draft == 0 || work.seq.draft < work.seq.rows {
        return false;
    }
    let drawn = seq
        .pick
        .as_ref()
        .and_then(|p| p.drawn_at(work.seq.position as usize));
    seq.void || drawn != work.proposals.first().copied()
}

/// The last stage drew `token` at `position`: a proposal there that is
/// another token voids the chunks of proposals only after it.
pub(super) fn check(seq: &mut Sequence, position: usize, token: u32) {
    let (first, proposals) = &seq.proposals;
    let proposed = position.checked_sub(*first).and_then(|i| proposals.get(i));
    if proposed.is_some_and(|&p| p != token) {
        seq.void = true;
    }
}

/// Puts the proposals of the sequences in `m` (an activations message
/// for `order`, less any left out) into it, in its batch order.
pub(super) fn attach(m: &mut Message, order: &[SeqRows], proposals: Vec<Vec<u32>>) {
    let Message::Activations(a) = m else {
        return;
    };
    let mut by_id: Vec<(u64, Vec<u32>)> =
        order.iter().map(|s| s.request_id).zip(proposals).collect();
    for s in &a.batch {
        if let Some(i) = by_id.iter().position(|(id, _)| *id == s.request_id) {
            a.proposals.extend(by_id.swap_remove(i).1);
        }
    }
}
