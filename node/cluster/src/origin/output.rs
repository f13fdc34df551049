//! The client's side of a request: the tokens from the last stage, their
//! log-probabilities as text, and the text through the stop sequences to
//! the client's events.

use engine::local::{GenerateEvent, GenerationStats, Progress, StopReason};
use engine::stop::StopMatcher;
use engine::tokenizer::Tokenizer;
use protocol::{Message, RequestError, TokenLogprobs};
use tokio::sync::mpsc;

use super::{AskEvent, Logprob, TopLogprob, TOKEN_TIMEOUT};

/// The client's side of a request: text through the stop sequences to
/// its events.
pub(super) struct Output<'a> {
    events: &'a mpsc::UnboundedSender<AskEvent>,
    stop: StopMatcher,
    /// A stop sequence was hit (the text stops before it).
    stopped: bool,
    /// The log-probabilities of the token about to be streamed.
    pub(super) logprob: Option<Logprob>,
}

impl<'a> Output<'a> {
    pub(super) fn new(
        events: &'a mpsc::UnboundedSender<AskEvent>,
        stop: Vec<String>,
    ) -> Output<'a> {
        Output {
            events,
            stop: StopMatcher::new(stop),
            stopped: false,
            logprob: None,
        }
    }

    /// Passes one event on; false when generation should stop (a stop
    /// sequence, or the client gone).
    pub(super) fn on_event(&mut self, e: GenerateEvent<'_>) -> bool {
        match e {
            GenerateEvent::Token { id, text } => {
                let (text, hit) = self.stop.push(text);
                self.stopped |= hit;
                let logprob = self.logprob.take();
                self.events
                    .send(AskEvent::Token { id, text, logprob })
                    .is_ok()
                    && !hit
            }
            GenerateEvent::Tail { text } => {
                let (text, hit) = self.stop.push(text);
                self.stopped |= hit;
                self.events.send(AskEvent::Tail { text }).is_ok()
            }
        }
    }

    /// The text held back at the end, and the request's stats.
    pub(super) fn finish(mut self, progress: Progress) -> GenerationStats {
        let mut on_event = |e: GenerateEvent<'_>| {
            if let GenerateEvent::Tail { text } = e {
                if !self.stopped {
                    let (text, hit) = self.stop.push(text);
                    self.stopped |= hit;
                    let _ = self.events.send(AskEvent::Tail { text });
                }
            }
            true
        };
        let mut stats = progress.finish(&mut on_event);
        let rest = self.stop.finish();
        if self.stopped {
            stats.stop = StopReason::StopSequence;
        } else if !rest.is_empty() {
            let _ = self.events.send(AskEvent::Tail { text: rest });
        }
        stats
    }
}

/// A token's log-probabilities with the tokens' texts.
pub(super) fn logprob(tokenizer: &Tokenizer, token: u32, l: &TokenLogprobs) -> Logprob {
    let piece = |id: u32| {
        let bytes = tokenizer.token_bytes(id).into_owned();
        (String::from_utf8_lossy(&bytes).into_owned(), bytes)
    };
    let (token, bytes) = piece(token);
    Logprob {
        token,
        bytes,
        logprob: l.logprob,
        top: l
            .top
            .iter()
            .map(|&(id, logprob)| {
                let (token, bytes) = piece(id);
                TopLogprob {
                    token,
                    bytes,
                    logprob,
                }
            })
            .collect(),
    }
}

/// The next token from the last stage, with its log-probabilities when
/// the request asked for them.
pub(super) async fn next_token(
    rx: &mut mpsc::Receiver<Message>,
) -> Result<(u32, Option<TokenLogprobs>), RequestError> {
    match tokio::time::timeout(TOKEN_TIMEOUT, rx.recv()).await {
        Err(_) => Err(RequestError::Timeout {
            secs: TOKEN_TIMEOUT.as_secs() as u32,
        }),
        Ok(None) => Err(RequestError::Cancelled),
        Ok(Some(Message::Tokens(mut t))) => Ok((t.entries[0].token, t.logprobs.pop())),
        Ok(Some(Message::Failed { error, .. })) => Err(error),
        // The data plane routes only Tokens and Failed to an origin.
        Ok(Some(_)) => Err(RequestError::Stage {
            node: "pipeline".into(),
            why: "unexpected message for an origin".into(),
        }),
    }
}
