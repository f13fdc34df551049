//! Speculative decoding's pure decisions: what to propose (prompt lookup),
//! how many tokens to propose (adaptive), and which proposals stand.
//!
//! **Prompt lookup** proposes the tokens that followed the most recent
//! earlier occurrence of the sequence's last n-gram (n from
//! [`NGRAM_MAX`] down to [`NGRAM_MIN`]): no draft model, strong wherever an
//! answer copies from its prompt or from itself (editing, quoting, code,
//! RAG answers).
//!
//! **Verification keeps the tokens.** The proposals are run with the last
//! token in one pass; at each position the sampler draws exactly as it
//! would have without speculation (its draw depends only on seed and
//! position, see `engine::sampling`), and a proposal stands only if it is
//! that token. So the output is the same tokens as without speculation,
//! greedy or seeded — not only the same distribution — and the first
//! rejected position gives the next token for free.
//!
//! **Adaptive length.** The proposal length follows the acceptance seen so
//! far and the measured cost of a pass: with per-token acceptance `a`, a
//! pass over `k` proposals yields `(1 - a^(k+1)) / (1 - a)` tokens and
//! costs `1 + k·r` plain steps (`r`: an extra row's time over a step's);
//! the `k` with the best ratio is used, none when no `k` beats a plain
//! step. After [`MISSES_OFF`] rounds in a row with nothing accepted, or
//! when nothing pays, speculation pauses for a while (then probes again),
//! so text that does not repeat itself pays (almost) nothing.
//!
//! **On a pipeline** proposals go on while earlier ones are in flight (the
//! origin's side), so a pass's cost says little: the time per token of
//! whole runs of speculation (from a trip with proposals until the next
//! trip of its own) is weighed against a plain step's instead, and the
//! proposals per chunk stay short ([`PIPELINED_DRAFT_MAX`]): the next
//! chunk follows at once, and a short one that fails wastes less.

/// Longest n-gram looked up.
pub const NGRAM_MAX: usize = 4;

/// Shortest n-gram looked up. One token: after an answer departs from
/// what it copies (a corrected word), lookup finds its place again at the
/// next token instead of the second (copy prompts on a pipeline: 1.42x to
/// 1.58x the plain pipeline). The noise it adds on free text is what the
/// adaptive length and its pauses are for.
pub const NGRAM_MIN: usize = 1;

/// Most tokens proposed at once: verification rows stay far below
/// [`crate::TILED_ROWS_MIN`], so attention runs the one-row kernel whose
/// arithmetic matches generating the tokens one at a time.
pub const DRAFT_MAX: usize = 8;

/// Rounds in a row with nothing accepted before speculation pauses.
pub const MISSES_OFF: u32 = 4;

/// Steps a pause lasts (plain one-token steps).
pub const PAUSE_STEPS: u32 = 32;

/// Most proposals per chunk on a pipeline. A run of speculation ends at
/// the first proposal that fails, however the proposals are cut into
/// chunks, so longer chunks add tokens only where the chunks in flight
/// (one per stage) hold fewer than a run: on two loopback stages copy
/// prompts ran fastest with 2 (against 4 and 8, `bench/speculative.sh`),
/// and the simulator's 70B office (4 stages, rows nearly free) did no
/// better with lengths chosen by [`best_length`] (acceptance 0.7: 549 ms
/// per token against 433 with 2).
pub const PIPELINED_DRAFT_MAX: usize = 2;

/// Acceptance under which proposals no longer go on in flight (see
/// [`Speculation::ahead`]; it starts at 0.5).
pub const AHEAD_ACCEPTANCE: f64 = 0.35;

/// How far back prompt lookup searches, tokens (bounds its cost on long
/// contexts).
pub const LOOKUP_WINDOW: usize = 8192;

/// Up to `k` tokens that followed an earlier occurrence of the history's
/// final n-gram (the longest n that occurs): the latest occurrence with `k`
/// tokens after it, else the latest one; or none.
pub fn prompt_lookup(history: &[u32], k: usize) -> Vec<u32> {
    let k = k.min(DRAFT_MAX);
    if k == 0 {
        return Vec::new();
    }
    let h = &history[history.len().saturating_sub(LOOKUP_WINDOW)..];
    for n in (NGRAM_MIN..=NGRAM_MAX).rev() {
        if h.len() <= n {
            continue;
        }
        let tail = &h[h.len() - n..];
        // Latest match first, not overlapping the tail itself.
        let mut latest: Option<&[u32]> = None;
        for start in (0..h.len() - n).rev() {
            if &h[start..start + n] == tail {
                let from = start + n;
                let next = &h[from..(from + k).min(h.len())];
                if next.len() == k {
                    return next.to_vec();
                }
                latest = latest.or(Some(next));
            }
        }
        if let Some(next) = latest.filter(|n| !n.is_empty()) {
            return next.to_vec();
        }
    }
    Vec::new()
}

/// How many of `drafts` stand, given the tokens the sampler drew at each
/// verified position (`drawn[i]` drawn where `drafts[i]` was proposed;
/// `drawn` has one more entry, after the last proposal). Returns the
/// count accepted; `drawn[count]` is the next token either way.
pub fn accepted(drafts: &[u32], drawn: &[u32]) -> usize {
    drafts.iter().zip(drawn).take_while(|(d, t)| d == t).count()
}

/// Smallest gain (tokens per unit of cost, over a plain step's 1) worth
/// speculating for.
pub const GAIN_MIN: f64 = 1.05;

/// Weight of the newest measurement in the running averages.
const EWMA: f64 = 0.2;

/// How much of the runs' sums each new run of speculation decays.
const RUN_DECAY: f64 = 0.3;

/// Steps of the first pause for runs of speculation that did not pay; it
/// doubles each time in a row, up to [`PAUSE_STEPS`]. Pausing
/// [`PAUSE_STEPS`] at once after one run cost the simulator's 70B office
/// at acceptance 0.7 half its gain (682 ms per token, against 433 when
/// three runs were judged together, which in turn cost free writing on
/// the loopback pipeline 7 %); a first pause of 4 probed free writing too
/// often.
const PAUSE_FIRST: u32 = 8;

/// One sequence's speculation state: the proposal length and its pauses.
#[derive(Debug, Clone)]
pub struct Speculation {
    /// Tokens to propose next round.
    length: usize,
    misses: u32,
    paused: u32,
    /// Running per-token acceptance.
    acceptance: f64,
    /// Running time of a plain one-token step, µs.
    step_us: Option<f64>,
    /// Running time of one extra row in a verification pass, µs.
    row_us: Option<f64>,
    /// Always propose this many (tests, benchmarks): no adapting.
    fixed: Option<usize>,
    /// Proposals go on in flight (a pipeline): runs are timed, not passes.
    pipelined: bool,
    /// Decayed sums of the tokens and the time (µs) of runs of speculation.
    run_tokens: f64,
    run_us: f64,
    /// Runs timed since the last pause.
    runs: u32,
    /// Pauses in a row for runs that did not pay.
    strikes: u32,
    /// Tokens proposed so far.
    pub proposed: u64,
    /// Of those, accepted.
    pub accepted: u64,
}

impl Default for Speculation {
    fn default() -> Self {
        Speculation {
            length: 4,
            misses: 0,
            paused: 0,
            acceptance: 0.5,
            step_us: None,
            row_us: None,
            fixed: None,
            pipelined: false,
            run_tokens: 0.0,
            run_us: 0.0,
            runs: 0,
            strikes: 0,
            proposed: 0,
            accepted: 0,
        }
    }
}

/// Expected tokens from a pass over `k` proposals at per-token acceptance
/// `a` (the accepted run, plus the token drawn after it).
pub fn expected_tokens(a: f64, k: usize) -> f64 {
    (0..=k).map(|i| a.powi(i as i32)).sum()
}

/// The proposal length with the best tokens per cost, and that gain;
/// `(0, 1.0)` when none beats a plain step by [`GAIN_MIN`]. `row` is an
/// extra row's cost relative to a plain step.
pub fn best_length(a: f64, row: f64) -> (usize, f64) {
    (1..=DRAFT_MAX)
        .map(|k| (k, expected_tokens(a, k) / (1.0 + k as f64 * row)))
        .filter(|&(_, g)| g >= GAIN_MIN)
        .max_by(|x, y| x.1.total_cmp(&y.1))
        .unwrap_or((0, 1.0))
}

impl Speculation {
    /// Adaptive speculation (`0`), or always `k` proposals (when found).
    pub fn new(k: usize) -> Speculation {
        Speculation {
            fixed: (k > 0).then_some(k.min(DRAFT_MAX)),
            ..Speculation::default()
        }
    }

    /// As [`Speculation::new`], for proposals in flight on a pipeline
    /// (see the module docs).
    pub fn pipelined(k: usize) -> Speculation {
        Speculation {
            pipelined: true,
            ..Speculation::new(k)
        }
    }

    /// How many tokens to propose now (0: a plain step).
    pub fn length(&mut self) -> usize {
        if let Some(k) = self.fixed {
            return k;
        }
        if self.paused > 0 {
            self.paused -= 1;
            return 0;
        }
        let Some(step) = self.step_us else {
            // A plain step first: the cost every choice is weighed against.
            return 0;
        };
        if self.pipelined {
            if self.runs > 0 {
                if self.run_us / self.run_tokens * GAIN_MIN > step {
                    // Runs of speculation cost more per token than plain
                    // steps: a pause, longer each time in a row (one short
                    // run can be luck: at acceptance 0.7 three in ten end
                    // at their first proposal).
                    self.strikes += 1;
                    self.pause();
                    self.paused = (PAUSE_FIRST << (self.strikes - 1).min(8)).min(PAUSE_STEPS);
                    return 0;
                }
                self.strikes = 0;
            }
            return self.length.clamp(1, PIPELINED_DRAFT_MAX);
        }
        if let Some(row) = self.row_us {
            let (k, _) = best_length(self.acceptance, row / step);
            if k == 0 {
                // Nothing pays now: plain steps, then probe again.
                self.pause();
                return 1;
            }
            return k.min(self.length.max(1) * 2);
        }
        self.length
    }

    /// Whether to send proposals on before the ones in flight are
    /// verified: a bet that they all stand, not made once most proposals
    /// fail (each chunk sent after a failed proposal is work for nothing,
    /// and on machines that share cores it slows the real one).
    pub fn ahead(&self) -> bool {
        self.fixed.is_some() || self.acceptance >= AHEAD_ACCEPTANCE
    }

    /// Plain steps for a while, then a probe that measures afresh.
    fn pause(&mut self) {
        self.paused = PAUSE_STEPS;
        self.run_tokens = 0.0;
        self.run_us = 0.0;
        self.runs = 0;
    }

    /// A run of speculation on a pipeline (see the module docs) gave
    /// `tokens` in `us`.
    pub fn timed_run(&mut self, tokens: usize, us: f64) {
        self.run_tokens = self.run_tokens * (1.0 - RUN_DECAY) + tokens as f64;
        self.run_us = self.run_us * (1.0 - RUN_DECAY) + us;
        self.runs += 1;
    }

    /// A plain one-token step took `us`.
    pub fn timed_step(&mut self, us: f64) {
        self.step_us = Some(ewma(self.step_us, us));
    }

    /// A verification pass over `rows` rows (the last token and its
    /// proposals) took `us`.
    pub fn timed_verify(&mut self, rows: usize, us: f64) {
        if let (Some(step), true) = (self.step_us, rows > 1) {
            let per_row = ((us - step) / (rows - 1) as f64).max(0.0);
            self.row_us = Some(ewma(self.row_us, per_row));
        }
    }

    /// A pass (or trip) with `proposed` proposals took `us` and `accepted`
    /// of them stood: its cost and its acceptance, learnt together.
    pub fn verified(&mut self, proposed: usize, accepted: usize, us: f64) {
        self.timed_verify(proposed + 1, us);
        self.record(proposed, accepted);
    }

    /// Learns from a round: `proposed` tokens, `accepted` of them stood.
    pub fn record(&mut self, proposed: usize, accepted: usize) {
        if proposed == 0 {
            return;
        }
        self.proposed += proposed as u64;
        self.accepted += accepted as u64;
        self.acceptance = ewma(Some(self.acceptance), accepted as f64 / proposed as f64);
        if accepted == 0 {
            self.misses += 1;
            self.length = (self.length / 2).max(1);
            if self.misses >= MISSES_OFF {
                self.misses = 0;
                self.pause();
            }
        } else {
            self.misses = 0;
            self.length = if accepted == proposed {
                (self.length * 2).min(DRAFT_MAX)
            } else {
                (accepted + 1).clamp(1, DRAFT_MAX)
            };
        }
    }
}

fn ewma(old: Option<f64>, new: f64) -> f64 {
    old.map_or(new, |o| o + EWMA * (new - o))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_proposes_what_followed_the_latest_match() {
        // ... 5 6 7 8 ... 5 6 7 → 8 9 (the latest occurrence wins).
        let h = [1, 5, 6, 7, 2, 3, 5, 6, 7, 8, 9, 4, 5, 6, 7];
        assert_eq!(prompt_lookup(&h, 2), vec![8, 9]);
        assert_eq!(prompt_lookup(&h, 0), Vec::<u32>::new());
        // No repeated n-gram: nothing.
        assert!(prompt_lookup(&[1, 2, 3, 4], 4).is_empty());
        // Capped at DRAFT_MAX and at the history's end.
        let rep: Vec<u32> = (0..40).map(|i| i % 5).collect();
        assert_eq!(prompt_lookup(&rep, 100).len(), DRAFT_MAX);
        assert_eq!(prompt_lookup(&[7, 7, 7], 4), vec![7]);
    }

    #[test]
    fn proposals_stand_up_to_the_first_difference() {
        assert_eq!(accepted(&[4, 5, 6], &[4, 5, 9, 1]), 2);
        assert_eq!(accepted(&[4, 5, 6], &[4, 5, 6, 1]), 3);
        assert_eq!(accepted(&[4], &[3, 0]), 0);
        assert_eq!(accepted(&[], &[3]), 0);
    }

    #[test]
    fn the_length_follows_acceptance_and_cost() {
        // Cheap rows (a pipeline's hop, a big model's weight reads): long
        // proposals at high acceptance.
        assert_eq!(best_length(0.9, 0.05).0, DRAFT_MAX);
        // Expensive rows (a small model on a CPU): nothing pays.
        assert_eq!(best_length(0.6, 0.7), (0, 1.0));
        assert!(best_length(0.0, 0.01).0 == 0);
        assert!((expected_tokens(0.5, 2) - 1.75).abs() < 1e-12);
        let mut s = Speculation::default();
        s.timed_step(10_000.0);
        s.timed_verify(5, 10_000.0 + 4.0 * 8_000.0);
        s.record(4, 2);
        // Each extra row costs 0.8 of a step: a probe, then a pause.
        assert_eq!(s.length(), 1);
        assert_eq!(s.length(), 0);
    }

    #[test]
    fn length_adapts_and_pauses_when_nothing_stands() {
        let mut s = Speculation::default();
        assert_eq!(s.length(), 0, "a plain step is measured first");
        s.timed_step(10_000.0);
        assert_eq!(s.length(), 4);
        s.record(4, 4);
        assert_eq!(s.length(), 8);
        s.record(8, 2);
        assert_eq!(s.length(), 3);
        for _ in 0..MISSES_OFF {
            let k = s.length();
            s.record(k, 0);
        }
        for _ in 0..PAUSE_STEPS {
            assert_eq!(s.length(), 0);
        }
        assert!(s.length() > 0);
        assert_eq!((s.proposed, s.accepted), (12 + 3 + 1 + 1 + 1, 6));
    }

    #[test]
    fn on_a_pipeline_runs_are_weighed_against_plain_steps() {
        let mut s = Speculation::pipelined(0);
        assert_eq!(s.length(), 0, "a plain step is measured first");
        s.timed_step(10_000.0);
        // Short chunks while runs pay; one poor run after good ones is luck.
        assert_eq!(s.length(), PIPELINED_DRAFT_MAX);
        s.timed_run(12, 60_000.0);
        s.timed_run(1, 15_000.0);
        assert_eq!(s.length(), PIPELINED_DRAFT_MAX);
        // Runs that cost more per token than a plain step: pauses that
        // double while they go on, each followed by a fresh probe.
        let mut pauses = Vec::new();
        for _ in 0..7 {
            for _ in 0..3 {
                s.timed_run(1, 15_000.0);
            }
            let mut n = 0;
            while s.length() == 0 {
                n += 1;
            }
            pauses.push(n);
        }
        let want: Vec<u32> = (0..7)
            .map(|i| (PAUSE_FIRST << i).min(PAUSE_STEPS) + 1)
            .collect();
        assert_eq!(pauses, want);
        // A run that pays ends the doubling.
        s.timed_run(10, 50_000.0);
        assert_eq!(s.length(), PIPELINED_DRAFT_MAX);
        while s.length() != 0 {
            s.timed_run(1, 15_000.0);
        }
        let mut n = 1;
        while s.length() == 0 {
            n += 1;
        }
        assert_eq!(n, PAUSE_FIRST + 1);
    }
}
