//! Speculation at the origin: proposals by prompt lookup sent with the
//! newest token, the last stage's draws at each of their positions read
//! back, and the proposals that match them kept (see
//! `schedule::speculate`: the tokens are the ones a plain run gives).

use std::time::Instant;

use protocol::{Message, RequestError, TokenLogprobs};
use schedule::speculate::{self, Speculation};
use tokio::sync::mpsc;

use super::output::next_token;

/// A token drawn by the last stage, with its log-probabilities if asked.
pub(super) type Drawn = (u32, Option<TokenLogprobs>);

/// One request's speculation: its adaptive length and the trip in flight.
pub(super) struct Speculating {
    spec: Speculation,
    sent: Instant,
    /// Proposals in the trip in flight.
    drafts: usize,
    /// A plain one-token trip is in flight (the prompt's trip is not one:
    /// its time is the prefill's).
    plain: bool,
}

impl Speculating {
    /// Adaptive (`0`) or always `k` proposals.
    pub(super) fn new(k: usize) -> Speculating {
        Speculating {
            spec: Speculation::new(k),
            sent: Instant::now(),
            drafts: 0,
            plain: false,
        }
    }

    /// The proposals to send with the newest token of `tokens`, at most
    /// `room` (what the request's reserved cache and token budget allow).
    pub(super) fn propose(&mut self, tokens: &[u32], room: usize) -> Vec<u32> {
        let k = self.spec.length().min(room);
        let drafts = speculate::prompt_lookup(tokens, k);
        self.drafts = drafts.len();
        self.plain = drafts.is_empty();
        self.sent = Instant::now();
        drafts
    }

    /// A token arrived from the pipeline (not from a verification's
    /// draws): times the plain trip that brought it.
    pub(super) fn token_arrived(&mut self) {
        if std::mem::take(&mut self.plain) {
            self.spec
                .timed_step(self.sent.elapsed().as_secs_f64() * 1e6);
        }
    }

    /// Reads the draws at each proposal's position and the one after;
    /// returns the accepted proposals and the next token, in order.
    pub(super) async fn verify(
        &mut self,
        rx: &mut mpsc::Receiver<Message>,
        drafts: &[u32],
    ) -> Result<(Vec<Drawn>, usize), RequestError> {
        let mut drawn = Vec::with_capacity(drafts.len() + 1);
        for _ in 0..=drafts.len() {
            drawn.push(next_token(rx).await?);
        }
        let ids: Vec<u32> = drawn.iter().map(|d| d.0).collect();
        let n = speculate::accepted(drafts, &ids);
        let us = self.sent.elapsed().as_secs_f64() * 1e6;
        self.spec.verified(drafts.len(), n, us);
        self.drafts = 0;
        drawn.truncate(n + 1);
        Ok((drawn, n))
    }
}
