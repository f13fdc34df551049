//! A request's trips through the pipeline, as its origin sees them: what
//! to send next, and what each token the last stage sends back means.
//! The origin (`cluster::origin`) and the simulator both run it.
//!
//! Without speculation one trip is in flight: the newest token goes in,
//! the next comes back. With it (see `schedule::speculate`), a trip
//! carries the newest token and proposals from prompt lookup; the last
//! stage draws at each of their positions and a proposal stands only if
//! it is the token drawn there, so the tokens are the ones a plain run
//! gives.
//!
//! **Proposals in flight.** One trip at a time leaves every stage but one
//! idle: on a pipeline, while a trip's proposals are still on their way,
//! the origin sends the next ones (what lookup proposes after them) as a
//! chunk of proposals only, up to one trip per stage. Each stage works on
//! the next chunk while the following one works on this, as in PipeInfer
//! (arXiv 2407.11798). A chunk stands only if every proposal before it
//! stood; at the first token drawn that differs from its proposal the
//! rest in flight is void: the rest of that trip's draws are read and
//! dropped, the last stage skips the trips after it (it knows the
//! proposals and applies the same rule) and sends nothing for them, and
//! the next chunk starts at that position with the token drawn (every
//! stage drops the cache past it).
//!
//! Proposals come from the caller (prompt lookup on a node, a model of it
//! in the simulator); the clock too (`now`).

use std::collections::VecDeque;
use std::time::Instant;

use crate::speculate::Speculation;

/// Most trips of one request's proposals in flight at once (one per stage
/// up to this).
pub const DEPTH_MAX: usize = 4;

/// Where proposals come from: up to `k` tokens to follow `context` (the
/// known tokens, then the proposals in flight).
pub type Propose<'a> = &'a mut dyn FnMut(&[u32], usize) -> Vec<u32>;

/// What the origin sends next: `tokens` at `position`, of which the last
/// `draft` are proposals.
#[derive(Debug, PartialEq, Eq)]
pub struct Chunk {
    pub position: usize,
    pub tokens: Vec<u32>,
    pub draft: usize,
}

/// What a token from the last stage is.
#[derive(Debug, PartialEq, Eq)]
pub enum Drawn {
    /// The request's next token.
    Next,
    /// A draw after a proposal that did not stand: dropped.
    Void,
}

/// A chunk in flight.
#[derive(Debug)]
struct Trip {
    /// Tokens still to come back for it.
    draws: usize,
    /// Proposals in it.
    proposed: usize,
    /// Of those, stood so far.
    accepted: usize,
    /// A proposal in it did not stand: its draws after that are void.
    /// (The trips after it are dropped: the last stage skips them.)
    void: bool,
    /// It carried a known token (a trip of its own, timed from `sent`).
    leads: bool,
    sent: Instant,
}

/// The request's limits on what may be proposed.
#[derive(Debug, Clone, Copy)]
pub struct Reach {
    /// Positions the stages hold cache for.
    pub context: usize,
    /// Prompt tokens.
    pub prompt: usize,
    /// Most tokens to generate.
    pub max_tokens: usize,
}

/// One request's trips: what is known, what is proposed, what is in flight.
pub struct Flight {
    spec: Option<Speculation>,
    /// Chunks in flight at most (one per stage, up to
    /// [`DEPTH_MAX`]; 1 without speculation).
    depth: usize,
    reach: Reach,
    /// Proposals sent and not decided yet, in order: positions from the
    /// known tokens' end on.
    pending: VecDeque<u32>,
    /// Rows sent that stand or may: positions below this.
    sent_to: usize,
    trips: VecDeque<Trip>,
    /// The speculation's (proposed, accepted) totals at the last
    /// [`Flight::take_counts`].
    reported: (u64, u64),
    /// The run of speculation going on (see `Speculation::timed_run`):
    /// since when, and the tokens it gave so far.
    run: Option<(Instant, usize)>,
}

impl Flight {
    /// After the prompt (`known` tokens, all sent, the last chunk sampled):
    /// `speculate` is `--speculate` (`Some(0)`: adaptive) and `stages` the
    /// pipeline's length.
    pub fn new(
        speculate: Option<usize>,
        stages: usize,
        reach: Reach,
        known: usize,
        now: Instant,
    ) -> Flight {
        let depth = stages.clamp(1, DEPTH_MAX);
        let spec = speculate.map(|k| match depth {
            1 => Speculation::new(k),
            _ => Speculation::pipelined(k),
        });
        Flight {
            depth: if spec.is_some() { depth } else { 1 },
            spec,
            run: None,
            reach,
            pending: VecDeque::new(),
            sent_to: known,
            trips: VecDeque::from([Trip {
                draws: 1,
                proposed: 0,
                accepted: 0,
                void: false,
                // The prompt's trip times a prefill, not a step.
                leads: false,
                sent: now,
            }]),
            reported: (0, 0),
        }
    }

    /// Proposals that may follow a row at `last` (the cache the stages
    /// hold and the token budget), at most `k`.
    fn room(&self, last: usize, k: usize) -> usize {
        let r = self.reach;
        k.min(r.context.saturating_sub(last + 1))
            .min((r.max_tokens + r.prompt).saturating_sub(last + 2))
    }

    /// The next chunk to send, if one is due; `known` are the tokens so
    /// far (prompt and generated).
    pub fn next_chunk(
        &mut self,
        known: &[u32],
        propose: Propose<'_>,
        now: Instant,
    ) -> Option<Chunk> {
        if self.sent_to < known.len() {
            // The newest token has not gone in: a trip of its own, with
            // proposals after it. (Nothing valid is in flight then.)
            let position = self.sent_to;
            let k = self.spec.as_mut().map_or(0, |s| s.length());
            let room = self.room(position, k);
            let drafts = if room > 0 {
                propose(known, room)
            } else {
                Vec::new()
            };
            let mut tokens = Vec::with_capacity(drafts.len() + 1);
            tokens.push(known[position]);
            tokens.extend_from_slice(&drafts);
            return Some(self.send(position, tokens, drafts.len(), true, now));
        }
        let spec = self.spec.as_mut()?;
        let in_flight = self.trips.iter().filter(|t| !t.void).count();
        if self.pending.is_empty() || in_flight >= self.depth || !spec.ahead() {
            return None;
        }
        // Proposals in flight: propose what lookup would after them.
        let k = spec.length();
        let mut ahead = known.to_vec();
        ahead.extend(&self.pending);
        let room = self.room(self.sent_to - 1, k);
        if room == 0 {
            return None;
        }
        let mut drafts = propose(&ahead, room);
        drafts.truncate(room);
        if drafts.is_empty() {
            return None;
        }
        let n = drafts.len();
        Some(self.send(self.sent_to, drafts, n, false, now))
    }

    fn send(
        &mut self,
        position: usize,
        tokens: Vec<u32>,
        draft: usize,
        leads: bool,
        now: Instant,
    ) -> Chunk {
        if leads {
            // A trip of its own ends the run before it; one with proposals
            // starts the next.
            if let (Some((since, n)), Some(spec)) = (self.run.take(), &mut self.spec) {
                spec.timed_run(n, micros(now, since));
            }
            self.run = (draft > 0).then_some((now, 0));
        }
        self.pending.extend(&tokens[tokens.len() - draft..]);
        self.sent_to = position + tokens.len();
        self.trips.push_back(Trip {
            draws: protocol::draws(tokens.len() as u32, draft as u32) as usize,
            proposed: draft,
            accepted: 0,
            void: false,
            leads,
            sent: now,
        });
        Chunk {
            position,
            tokens,
            draft,
        }
    }

    /// The last stage sent `token`, drawn after the `known` tokens (or
    /// void); `None` when no draw was due (a stage that sends more than
    /// it was asked for).
    pub fn drawn(&mut self, token: u32, known: usize, now: Instant) -> Option<Drawn> {
        let trip = self.trips.front_mut()?;
        trip.draws -= 1;
        let verdict = if trip.void {
            Drawn::Void
        } else {
            match self.pending.pop_front() {
                Some(p) if p == token => trip.accepted += 1,
                Some(_) => {
                    // The proposal there did not stand: the rest of this
                    // trip's draws are void, the trips after it are
                    // skipped by the last stage (the same rule: see
                    // `protocol::Activations::proposals`), and the token
                    // drawn goes in next.
                    self.pending.clear();
                    self.sent_to = known;
                    trip.void = true;
                    self.trips.truncate(1);
                }
                None => {}
            }
            if let Some((_, n)) = &mut self.run {
                *n += 1;
            }
            Drawn::Next
        };
        if self.trips[0].draws == 0 {
            let trip = self.trips.pop_front().expect("front");
            self.finished(&trip, now);
        }
        Some(verdict)
    }

    /// Learns from a trip whose draws all came back.
    fn finished(&mut self, trip: &Trip, now: Instant) {
        let Some(spec) = &mut self.spec else {
            return;
        };
        let us = micros(now, trip.sent);
        match (trip.leads, trip.proposed) {
            // A trip of its own times a step or a verification; one of
            // proposals only waited behind the one before it.
            (true, 0) => spec.timed_step(us),
            (true, k) => spec.verified(k, trip.accepted, us),
            (false, k) => spec.record(k, trip.accepted),
        }
    }

    /// Proposals decided since the last call: (proposed, accepted).
    pub fn take_counts(&mut self) -> (usize, usize) {
        let Some(spec) = &self.spec else {
            return (0, 0);
        };
        let (was, now) = (self.reported, (spec.proposed, spec.accepted));
        self.reported = now;
        ((now.0 - was.0) as usize, (now.1 - was.1) as usize)
    }
}

fn micros(now: Instant, since: Instant) -> f64 {
    now.saturating_duration_since(since).as_secs_f64() * 1e6
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::speculate;

    const REACH: Reach = Reach {
        context: 1000,
        prompt: 0,
        max_tokens: 1000,
    };

    /// A pipeline whose last stage draws `truth[position]` where every
    /// input before is true (and junk where not), answering chunks in
    /// order: the tokens the request gets, and the chunks sent.
    fn run(
        truth: &[u32],
        prompt: usize,
        speculate: Option<usize>,
        stages: usize,
    ) -> (Vec<u32>, Vec<Chunk>) {
        let reach = Reach {
            context: truth.len(),
            prompt,
            max_tokens: truth.len() - prompt,
        };
        let t = Instant::now();
        let mut f = Flight::new(speculate, stages, reach, prompt, t);
        let mut lookup = |c: &[u32], k: usize| speculate::prompt_lookup(c, k);
        let mut known = truth[..prompt].to_vec();
        let mut sent: Vec<Chunk> = Vec::new();
        // Draws on their way back, the prompt's first.
        let mut inbox = VecDeque::from([(prompt, truth[prompt])]);
        // The tokens the stages hold, by position.
        let mut inputs = known.clone();
        while known.len() < truth.len() {
            while let Some(c) = f.next_chunk(&known, &mut lookup, t) {
                inputs.truncate(c.position);
                inputs.extend(&c.tokens);
                let n = protocol::draws(c.tokens.len() as u32, c.draft as u32) as usize;
                let first = c.position + c.tokens.len() - n + 1;
                // The last stage skips a chunk of proposals only after a
                // proposal that did not stand.
                let void =
                    c.draft == c.tokens.len() && inputs[..=c.position] != truth[..=c.position];
                if !void {
                    inbox.extend((first..first + n).map(|p| {
                        let good = inputs[..p] == truth[..p];
                        (p, truth.get(p).copied().filter(|_| good).unwrap_or(9999))
                    }));
                }
                sent.push(c);
            }
            let (p, tok) = inbox.pop_front().expect("a draw in flight");
            if f.drawn(tok, known.len(), t).expect("a draw was due") == Drawn::Next {
                assert_eq!((p, tok), (known.len(), truth[p]), "the next token");
                known.push(tok);
            }
        }
        (known, sent)
    }

    #[test]
    fn the_tokens_are_the_plain_ones_with_proposals_in_flight() {
        // A text that repeats itself, then does not, then does again.
        let mut truth: Vec<u32> = (0..40).map(|i| i % 7).collect();
        truth.extend(100..140);
        truth.extend((0..40).map(|i| i % 7));
        for spec in [None, Some(0), Some(2), Some(4), Some(8)] {
            for stages in [1, 2, 4] {
                let (tokens, sent) = run(&truth, 10, spec, stages);
                assert_eq!(tokens, truth, "{spec:?} over {stages} stages");
                if spec.is_none() {
                    assert!(sent.iter().all(|c| c.tokens.len() == 1));
                }
                if spec == Some(4) && stages > 1 {
                    // Chunks of proposals only went out.
                    assert!(sent.iter().any(|c| c.draft == c.tokens.len()), "{sent:?}");
                }
            }
        }
    }

    #[test]
    fn a_proposal_that_does_not_stand_voids_what_follows_it() {
        let t = Instant::now();
        let mut f = Flight::new(Some(2), 2, REACH, 4, t);
        let mut lookup = |c: &[u32], k: usize| speculate::prompt_lookup(c, k);
        let known = vec![1, 2, 1, 2];
        assert!(matches!(f.drawn(1, 4, t), Some(Drawn::Next)));
        let known = [known, vec![1]].concat();
        // [1 | 2 1] at 4, then proposals only [2 1] at 7.
        let a = f.next_chunk(&known, &mut lookup, t).unwrap();
        assert_eq!(
            (a.position, a.tokens.clone(), a.draft),
            (4, vec![1, 2, 1], 2)
        );
        let b = f.next_chunk(&known, &mut lookup, t).unwrap();
        assert_eq!((b.position, b.tokens.clone(), b.draft), (7, vec![2, 1], 2));
        assert!(
            f.next_chunk(&known, &mut lookup, t).is_none(),
            "two stages: two chunks"
        );
        // The draw at 5 stands (2), the one at 6 does not (7 for 1).
        assert_eq!(f.drawn(2, 5, t), Some(Drawn::Next));
        assert_eq!(f.drawn(7, 6, t), Some(Drawn::Next));
        // The rest of that trip is void; the last stage sends nothing for
        // the next one.
        assert_eq!(f.drawn(0, 7, t), Some(Drawn::Void));
        let known = [known, vec![2, 7]].concat();
        let c = f.next_chunk(&known, &mut lookup, t).unwrap();
        assert_eq!(
            (c.position, c.tokens[0]),
            (6, 7),
            "the drawn token goes in at 6"
        );
        assert_eq!(f.take_counts(), (2, 1));
        // What comes next is the new trip's.
        for _ in 0..protocol::draws(c.tokens.len() as u32, c.draft as u32) {
            assert_eq!(f.drawn(5, 7, t), Some(Drawn::Next));
        }
    }

    #[test]
    fn proposals_stay_within_the_cache_and_the_budget() {
        let truth: Vec<u32> = (0..30).map(|i| i % 3).collect();
        for stages in [1, 2] {
            let (tokens, sent) = run(&truth, 9, Some(8), stages);
            assert_eq!(tokens, truth);
            for c in &sent {
                assert!(c.position + c.tokens.len() <= truth.len(), "{c:?}");
            }
        }
        // A stage that sends more than asked for gets no say.
        let t = Instant::now();
        let mut f = Flight::new(None, 1, REACH, 3, t);
        assert!(f.drawn(5, 3, t).is_some());
        assert!(f.drawn(5, 4, t).is_none());
    }
}
