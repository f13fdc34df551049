//! The last stage's choice of each token: the penalties, the grammar's
//! mask (structured output), the draw, and the log-probabilities the
//! origin asked for.

use std::sync::Arc;

use engine::grammar::{GrammarError, Grammars, Guide};
use engine::sampling::{self, Sampler, SamplingParams};
use protocol::{Begin, Message, RequestError, SampledToken, SeqRows, TokenLogprobs, Tokens};
use tracing::warn;

use crate::dataplane::short;

use super::Worker;

/// One request's sampling state at the last stage.
pub(super) struct Pick {
    sampler: Sampler,
    /// The tokens the penalties look back on: the prompt, then every token
    /// drawn.
    history: Vec<u32>,
    guide: Option<Guide>,
    logprobs: Option<u8>,
}

/// A drawn token and, when asked for, its log-probability and the best
/// alternatives'.
pub(super) type Drawn = (u32, Option<(f32, Vec<(u32, f32)>)>);

impl Pick {
    /// Keeps the first `len` tokens of the history: a chunk starting at
    /// position `p` with `n` known tokens means the history holds exactly
    /// `p + n` (draws made for proposals that were rejected go).
    pub(super) fn keep_history(&mut self, len: usize) {
        self.history.truncate(len);
    }

    /// The token drawn (or given in the prompt) at `position`, if any.
    pub(super) fn drawn_at(&self, position: usize) -> Option<u32> {
        self.history.get(position).copied()
    }

    /// Draws the next token from a row of logits.
    pub(super) fn next(&mut self, mut logits: Vec<f32>) -> Result<Drawn, GrammarError> {
        if let Some(g) = &mut self.guide {
            g.mask(&mut logits)?;
        }
        let adjusted = self.sampler.adjusted(logits, &self.history);
        let token = self.sampler.pick(&adjusted, self.history.len());
        if let Some(g) = &mut self.guide {
            g.advance(token)?;
        }
        self.history.push(token);
        let logprobs = self
            .logprobs
            .map(|n| sampling::logprobs(&adjusted, token, usize::from(n)));
        Ok((token, logprobs))
    }
}

impl Worker {
    /// The sampling state of a request this (last) stage begins: its
    /// grammar, when it has one, fed the tokens generated before a replay.
    pub(super) fn pick_for(&mut self, b: &Begin) -> Result<Pick, RequestError> {
        let guide = match &b.constraint {
            None => None,
            Some(c) => {
                let bad = |e: GrammarError| RequestError::BadInput(e.to_string());
                let mut guide = self.grammars().map_err(bad)?.guide(c).map_err(bad)?;
                let generated = b.prompt.get(b.prompt_len as usize..).unwrap_or_default();
                guide.advance_all(generated).map_err(bad)?;
                Some(guide)
            }
        };
        Ok(Pick {
            sampler: Sampler::new(SamplingParams::from(&b.sampling)),
            history: b.prompt.clone(),
            guide,
            logprobs: b.logprobs,
        })
    }

    /// The model's grammar compiler (`TextModel::grammars`, built once on
    /// first use: ~0.1–0.3 s; a node whose requests have no grammar never
    /// pays it), from the text model the origin shares, loaded here from
    /// the GGUF if the origin has not yet.
    fn grammars(&mut self) -> Result<Arc<Grammars>, GrammarError> {
        let text = match self.cfg.text.get() {
            Some(t) => t.clone(),
            None => {
                let gguf = sharding::GgufFile::open(&self.cfg.model)
                    .map_err(|e| GrammarError::Vocabulary(e.to_string()))?;
                let t = engine::text::TextModel::from_gguf(&gguf)
                    .map(Arc::new)
                    .map_err(|e| GrammarError::Vocabulary(e.to_string()))?;
                // The origin may have set it meanwhile: either is the same.
                let _ = self.cfg.text.set(t.clone());
                t
            }
        };
        text.grammars()
    }
}

impl Worker {
    /// Draws each sampling row's token and sends the tokens (with their
    /// log-probabilities) to their origins, one message per origin.
    pub(super) fn send_tokens(&mut self, l: candle_core::Tensor, order: &[SeqRows]) {
        let rows = match l.to_vec2::<f32>() {
            Ok(r) => r,
            Err(e) => {
                self.fail_all(order, &e.to_string());
                return;
            }
        };
        let mut by_origin: Vec<(String, Tokens)> = Vec::new();
        let mut stuck = Vec::new();
        let mut rows = rows.into_iter();
        // One row per sequence, or one per position of a chunk with
        // proposals: the token drawn at each (the origin keeps the
        // proposals that match, and the draw after them).
        let per_seq = order.iter().flat_map(|s| {
            let n = protocol::draws(s.rows, s.draft);
            (0..n).map(move |i| (s, s.rows - n + i + 1))
        });
        for (s, ahead) in per_seq {
            let Some(logits) = rows.next() else {
                break;
            };
            if !s.sample {
                continue;
            }
            let Some(seq) = self.seqs.get_mut(&s.request_id) else {
                continue;
            };
            let pick = seq.pick.as_mut().expect("last stage has a sampler");
            let (token, logprobs) = match pick.next(logits) {
                Ok(drawn) => drawn,
                Err(e) => {
                    stuck.push((s.request_id, e));
                    continue;
                }
            };
            let position = s.position + ahead;
            super::speculate::check(seq, position as usize, token);
            let to = match by_origin.iter_mut().find(|(o, _)| *o == seq.origin) {
                Some((_, t)) => t,
                None => {
                    by_origin.push((
                        seq.origin.clone(),
                        Tokens {
                            entries: Vec::new(),
                            logprobs: Vec::new(),
                        },
                    ));
                    &mut by_origin.last_mut().expect("just pushed").1
                }
            };
            to.entries.push(SampledToken {
                request_id: s.request_id,
                position,
                token,
            });
            if let Some((logprob, top)) = logprobs {
                to.logprobs.push(TokenLogprobs {
                    request_id: s.request_id,
                    position,
                    logprob,
                    top,
                });
            }
        }
        for (id, e) in stuck {
            self.fail(id, RequestError::BadInput(e.to_string()));
        }
        for (origin, tokens) in by_origin {
            let ids: Vec<u64> = tokens.entries.iter().map(|e| e.request_id).collect();
            if !self.out.send_now(&origin, Message::Tokens(tokens)) {
                // An origin that does not read holds no one else up.
                warn!(origin = %short(&origin), "origin not reading its tokens: its requests dropped here");
                for id in ids {
                    self.cancel(id);
                }
            }
        }
    }
}
