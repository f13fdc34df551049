//! A request's origin: the node a client asked. It tokenizes the prompt,
//! opens the request along the pipeline, feeds the first stage, and turns
//! the tokens the last stage sends back into streamed text.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use engine::chat;
use engine::local::{GenerationStats, Progress};
use engine::sampling::SamplingParams;
use protocol::{Begin, Constraint, Input, Message, RequestError, Sampling};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::{info, info_span, Instrument};

use crate::shared::Shared;

mod output;
use output::{next_token, Output};
use schedule::flight::{Drawn, Flight, Reach};
use schedule::speculate::prompt_lookup;

/// Longest a request waits for one token: a stage that takes longer is
/// stuck, and the client gets an error instead of a hang. Generous, since a
/// big model on slow machines can take seconds per token.
pub const TOKEN_TIMEOUT: Duration = Duration::from_secs(120);

/// Recent requests kept for status.
const RECENT_MAX: usize = 32;

/// Longest a prompt may take to render and tokenize (a megabyte of text
/// takes well under a second).
const TOKENIZE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a request that lost a stage waits for the plan without it
/// before going on under whatever plan holds (a lost connection, not a
/// lost node): failure detection takes a few seconds (see `swarm`).
const REPLAN_WAIT: Duration = Duration::from_secs(8);

/// How long a request that lost a stage waits for any plan in all before
/// it fails.
const REPLAY_WAIT: Duration = Duration::from_secs(30);

/// Longest a request waits for a stage to have room for its KV cache
/// before it gets the stage's 503.
const ADMIT_WAIT: Duration = Duration::from_secs(30);

/// Longest pause between two tries at a full stage (from 50 ms, doubling).
const ADMIT_POLL_MAX: Duration = Duration::from_millis(500);

/// Most replays of one request: a request that keeps losing its pipeline
/// (a stage crashing on it) ends with the last error.
const REPLAYS_MAX: u32 = 8;

/// Whether a request that ended with `e` can go on under another plan:
/// it lost a stage or its plan, not its input or a stage's judgement of it.
/// A timeout is not: a stage that is stuck but still answers pings stays
/// in the plan, and a replay would wait on it again.
fn replayable(e: &RequestError) -> bool {
    matches!(
        e,
        RequestError::StageLost { .. } | RequestError::Replanned | RequestError::NoPlan
    )
}

/// What a client asks for.
#[derive(Debug, Clone)]
pub struct AskRequest {
    /// What to continue.
    pub prompt: Prompt,
    /// Stop sequences: generation ends before the first one (not shown).
    pub stop: Vec<String>,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Sampling settings.
    pub sampling: SamplingParams,
    /// Context window (default: the node's).
    pub context: Option<usize>,
    /// Functions the model may call (shown to it with the conversation).
    pub tools: Vec<engine::chat::tools::Tool>,
    /// A grammar the answer follows (structured output, tool calls).
    pub constraint: Option<Constraint>,
    /// Log-probabilities with each token: `Some(n)` for the token's own
    /// and the `n` most likely ones'.
    pub logprobs: Option<u8>,
    /// Whether it may speculate (when the node does: `--speculate`); the
    /// tokens are the same either way.
    pub speculate: bool,
}

/// A request's input.
#[derive(Debug, Clone)]
pub enum Prompt {
    /// Text fed as is (completion).
    Raw(String),
    /// A conversation, rendered with the model's chat template.
    Chat(Vec<chat::Message>),
    /// Fill in the middle: the text to write between `prefix` and
    /// `suffix`, with the model's FIM tokens.
    Infill {
        /// Text before.
        prefix: String,
        /// Text after.
        suffix: String,
    },
}

/// What the client sees, in order.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AskEvent {
    /// Text of one token (possibly empty mid-character).
    Token {
        /// The token id.
        id: u32,
        /// Its text.
        text: String,
        /// Its log-probability and the best alternatives', when asked for.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        logprob: Option<Logprob>,
    },
    /// Text left at the end.
    Tail {
        /// The text.
        text: String,
    },
    /// Finished.
    Done {
        /// Timings and why it stopped.
        stats: GenerationStats,
    },
    /// Failed.
    Error {
        /// What went wrong, as a person reads it (the shape older clients
        /// read: `{"error": {"message": ...}}`).
        message: String,
        /// What went wrong, typed.
        error: RequestError,
    },
}

/// A token's log-probability and its best rivals', with their texts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Logprob {
    /// The token's text (its bytes, lossily as UTF-8).
    pub token: String,
    /// Its bytes.
    pub bytes: Vec<u8>,
    /// Its log-probability.
    pub logprob: f32,
    /// The most likely tokens at this position, best first.
    pub top: Vec<TopLogprob>,
}

/// One of the most likely tokens at a position.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TopLogprob {
    /// Its text.
    pub token: String,
    /// Its bytes.
    pub bytes: Vec<u8>,
    /// Its log-probability.
    pub logprob: f32,
}

/// Counters for the status page.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct NodeStats {
    /// Requests running now.
    pub running: usize,
    /// Requests finished.
    pub finished: u64,
    /// Requests failed.
    pub failed: u64,
    /// Tokens generated.
    pub tokens: u64,
    /// Requests that lost a stage and went on under the next plan.
    #[serde(default)]
    pub replays: u64,
    /// Recent requests: (prompt tokens, generated, ttft ms, tok/s).
    pub recent: VecDeque<RecentRequest>,
}

/// One finished request, for status.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecentRequest {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub gen_tokens: usize,
    /// Time to first token, ms.
    pub ttft_ms: f64,
    /// Generation speed, tokens per second.
    pub tokens_per_s: f64,
}

impl Shared {
    /// Runs `req` through the pipeline, streaming events to `events`.
    /// Dropping the receiver cancels the request along the chain.
    pub(crate) async fn ask(
        self: &Arc<Self>,
        req: AskRequest,
        events: mpsc::UnboundedSender<AskEvent>,
    ) {
        let request_id: u64 = rand::random();
        let span = info_span!("request", request_id);
        self.stats.lock().expect("lock").running += 1;
        self.metrics.requests_running.inc();
        let result = self.run(request_id, req, &events).instrument(span).await;
        let mut stats = self.stats.lock().expect("lock");
        stats.running -= 1;
        self.metrics.requests_running.dec();
        match result {
            Ok(s) => {
                self.metrics.requests_finished.inc();
                self.metrics.tokens.inc_by(s.gen_tokens as u64);
                self.metrics.ttft.observe(s.ttft_ms / 1000.0);
                stats.finished += 1;
                stats.tokens += s.gen_tokens as u64;
                let rate = if s.gen_ms > 0.0 {
                    s.gen_tokens.saturating_sub(1) as f64 * 1000.0 / s.gen_ms
                } else {
                    0.0
                };
                stats.recent.push_front(RecentRequest {
                    prompt_tokens: s.prompt_tokens,
                    gen_tokens: s.gen_tokens,
                    ttft_ms: s.ttft_ms,
                    tokens_per_s: rate,
                });
                stats.recent.truncate(RECENT_MAX);
                let _ = events.send(AskEvent::Done { stats: s });
            }
            Err(error) => {
                self.metrics.requests_failed.inc();
                stats.failed += 1;
                let _ = events.send(AskEvent::Error {
                    message: error.to_string(),
                    error,
                });
            }
        }
    }

    /// After a stage was lost under plan `epoch`: waits for the plan that
    /// follows it (the lost node out) up to [`REPLAN_WAIT`], then for any
    /// plan up to [`REPLAY_WAIT`] in all; false when none came.
    async fn wait_for_next_plan(&self, epoch: Option<u64>) -> bool {
        let mut rx = self.plan.clone();
        let newer = |p: &Option<protocol::Plan>| p.as_ref().is_some_and(|p| Some(p.epoch) != epoch);
        if tokio::time::timeout(REPLAN_WAIT, rx.wait_for(newer))
            .await
            .is_ok()
        {
            return true;
        }
        // No new plan: the link failed but the node is still a member (a
        // lost connection, not a lost node). Go on under whatever plan holds.
        let rest = REPLAY_WAIT.saturating_sub(REPLAN_WAIT);
        tokio::time::timeout(rest, rx.wait_for(Option::is_some))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Runs a request to its end. When a stage other than this node is
    /// lost (or the plan changes under the request), the request goes on
    /// under the next plan: its prompt and every token generated so far
    /// are sent as the new request's input, and the stages rebuild their
    /// caches from them. Sampling draws depend only on the seed and the
    /// position (see `engine::sampling`), so the continuation is the one
    /// the request would have had; the client sees one stream.
    async fn run(
        self: &Arc<Self>,
        first_id: u64,
        req: AskRequest,
        events: &mpsc::UnboundedSender<AskEvent>,
    ) -> Result<GenerationStats, RequestError> {
        let start = Instant::now();
        let text = self
            .text()
            .await
            .map_err(|e| RequestError::Model(e.to_string()))?;
        let (prompt, context) = self.tokenize(text.clone(), &req).await?;
        if let Some(c) = &req.constraint {
            check_grammar(text.clone(), c.clone()).await?;
        }
        // What the stages hold KV for: what the request can reach.
        let reach = context.min(
            prompt
                .len()
                .saturating_add(req.max_tokens)
                .saturating_add(1),
        );
        let mut out = Output::new(events, req.stop.clone());
        let mut progress: Option<Progress> = None;
        // The prompt and every token generated: a replay's input.
        let mut tokens = prompt.clone();
        let mut request_id = first_id;
        let mut replays = 0;
        let mut last_token_at: Option<Instant> = None;
        let admit_wait = Instant::now();
        let mut admit_backoff = Duration::from_millis(50);
        'attempt: loop {
            let epoch = self.plan.borrow().as_ref().map(|p| p.epoch);
            let opened = self
                .open(request_id, &req, &tokens, prompt.len(), reach)
                .await;
            let mut lost = match opened {
                Ok((mut rx, guard)) => {
                    // Speculation (`--speculate`), not with a grammar (its
                    // state at the last stage would have to roll back too).
                    let speculate = self
                        .config
                        .speculate
                        .filter(|_| req.speculate && req.constraint.is_none());
                    let limits = Reach {
                        context: reach,
                        prompt: prompt.len(),
                        max_tokens: req.max_tokens,
                    };
                    let mut flight = Flight::new(
                        speculate,
                        guard.stages,
                        limits,
                        tokens.len(),
                        Instant::now(),
                    );
                    let mut lookup = |c: &[u32], k: usize| prompt_lookup(c, k);
                    'trips: loop {
                        while let Some(c) = flight.next_chunk(&tokens, &mut lookup, Instant::now())
                        {
                            let input = Input {
                                request_id,
                                position: c.position as u32,
                                tokens: c.tokens,
                                sample: true,
                                draft: c.draft as u32,
                            };
                            if let Err(e) = self.data.send(&guard.head, Message::Input(input)).await
                            {
                                break 'trips e.into();
                            }
                        }
                        let (id, logprobs) = match next_token(&mut rx).await {
                            Ok(d) => d,
                            Err(e) => break e,
                        };
                        match flight.drawn(id, tokens.len(), Instant::now()) {
                            Some(Drawn::Next) => {}
                            Some(Drawn::Void) => continue,
                            None => {
                                break RequestError::Stage {
                                    node: crate::dataplane::short(&guard.last).into(),
                                    why: "a token it was not asked for".into(),
                                }
                            }
                        }
                        let (proposed, accepted) = flight.take_counts();
                        if proposed > 0 {
                            self.metrics.speculation_proposed.inc_by(proposed as u64);
                            self.metrics.speculation_accepted.inc_by(accepted as u64);
                        }
                        out.logprob = logprobs.map(|l| output::logprob(text.tokenizer(), id, &l));
                        if progress.is_none() {
                            info!(prompt_tokens = prompt.len(), "first token");
                        }
                        let p = progress.get_or_insert_with(|| Progress::new(prompt.len(), start));
                        p.speculated(proposed, accepted);
                        self.count_token(&mut last_token_at);
                        tokens.push(id);
                        let room = tokens.len() <= context;
                        if !p.on_token(text.tokenizer(), id, req.max_tokens, room, &mut |e| {
                            out.on_event(e)
                        }) {
                            drop(guard);
                            break 'attempt;
                        }
                    }
                }
                Err(e) => e,
            };
            // A stage without room for one more KV cache (or sequence) now
            // will have it when a request ends: wait in line for it, as
            // a client of one machine would wait for a slot.
            if matches!(
                lost,
                RequestError::StageMemory { .. } | RequestError::StageFull { .. }
            ) && admit_wait.elapsed() < ADMIT_WAIT
            {
                tokio::time::sleep(admit_backoff).await;
                admit_backoff = (admit_backoff * 2).min(ADMIT_POLL_MAX);
                request_id = rand::random();
                continue;
            }
            if !replayable(&lost) || replays >= REPLAYS_MAX {
                return Err(lost);
            }
            replays += 1;
            self.metrics.replays.inc();
            self.stats.lock().expect("lock").replays += 1;
            info!(
                tokens = tokens.len(),
                replays, "request lost its pipeline ({lost}): replaying on the next plan"
            );
            if !self.wait_for_next_plan(epoch).await {
                lost = RequestError::StageLost {
                    node: "cluster".into(),
                    why: format!(
                        "a stage was lost ({lost}) and no plan came back within {} s",
                        REPLAY_WAIT.as_secs()
                    ),
                };
                return Err(lost);
            }
            request_id = rand::random();
        }
        Ok(out.finish(progress.expect("at least one token")))
    }

    /// The request's prompt as tokens, checked against its context; and
    /// that context (the request's, at most the node's).
    ///
    /// Rendering the template and tokenizing run on a blocking thread, not
    /// the one async thread that serves control, QUIC and HTTP: a template
    /// that loops for long (bounded by its fuel, see `engine::chat`) or a
    /// megabyte of text delays this request only.
    async fn tokenize(
        &self,
        text: Arc<engine::text::TextModel>,
        req: &AskRequest,
    ) -> Result<(Vec<u32>, usize), RequestError> {
        let input = req.prompt.clone();
        let tools = req.tools.clone();
        let work = tokio::task::spawn_blocking(move || match &input {
            Prompt::Raw(t) => text.raw_tokens(t),
            Prompt::Chat(msgs) => text.chat_tokens_with_tools(msgs, &tools),
            Prompt::Infill { prefix, suffix } => text.infill_tokens(prefix, suffix),
        });
        let prompt = match tokio::time::timeout(TOKENIZE_TIMEOUT, work).await {
            Ok(Ok(r)) => r.map_err(|e| RequestError::BadInput(e.to_string()))?,
            Ok(Err(e)) => return Err(RequestError::BadInput(format!("tokenizing failed: {e}"))),
            Err(_) => {
                return Err(RequestError::BadInput(format!(
                    "the prompt took over {} s to render and tokenize",
                    TOKENIZE_TIMEOUT.as_secs()
                )))
            }
        };
        let context = req
            .context
            .unwrap_or(self.config.context)
            .min(self.config.context);
        if prompt.is_empty() {
            return Err(RequestError::EmptyPrompt);
        }
        if prompt.len() >= context {
            return Err(RequestError::ContextFull {
                needed: prompt.len() as u32,
                context: context as u32,
            });
        }
        Ok((prompt, context))
    }

    /// Opens the request along the plan in force: `Begin`, then its input
    /// to the first stage — `tokens` is the prompt (its first `prompt_len`)
    /// and, on a replay, the tokens generated before. Its tokens arrive on
    /// the receiver; the guard frees it along the chain when dropped.
    ///
    /// A replay feeds the stages exactly as the first run did: the prompt
    /// in the same chunks, the generated tokens in chunks under
    /// [`schedule::TILED_ROWS_MIN`] rows (the one-row attention kernel that
    /// computed them one at a time), so every position's keys and values
    /// come out bit for bit as before and the continuation is the same.
    async fn open(
        self: &Arc<Self>,
        request_id: u64,
        req: &AskRequest,
        tokens: &[u32],
        prompt_len: usize,
        reach: usize,
    ) -> Result<(mpsc::Receiver<Message>, RequestGuard), RequestError> {
        let plan = self
            .plan
            .borrow()
            .clone()
            .ok_or_else(|| self.no_plan_reason())?;
        let head = plan.stages[0].node_id.clone();
        let route: Vec<String> = plan.stages.iter().map(|s| s.node_id.clone()).collect();
        let guard = RequestGuard {
            shared: self.clone(),
            id: request_id,
            head: head.clone(),
            last: route.last().cloned().unwrap_or_default(),
            stages: route.len(),
        };
        let rx = self.data.open_request(request_id, route);
        // The stages hold KV for what this request can reach, not the whole
        // window: they admit by memory (see `worker`), and a short answer
        // should not cost a full context there.
        let begin = Begin {
            request_id,
            epoch: plan.epoch,
            origin: self.node_id.clone(),
            context: reach as u32,
            sampling: Sampling::from(&req.sampling),
            prompt: tokens.to_vec(),
            prompt_len: prompt_len as u32,
            constraint: req.constraint.clone(),
            logprobs: req.logprobs,
        };
        self.data.send(&head, Message::Begin(begin)).await?;
        let prompt = schedule::prompt_chunks(prompt_len).map(|c| (c.start, c.rows));
        let since = (prompt_len..tokens.len())
            .step_by(schedule::TILED_ROWS_MIN - 1)
            .map(|start| {
                (
                    start,
                    (tokens.len() - start).min(schedule::TILED_ROWS_MIN - 1),
                )
            });
        for (start, rows) in prompt.chain(since) {
            let input = Input {
                request_id,
                position: start as u32,
                tokens: tokens[start..start + rows].to_vec(),
                sample: start + rows == tokens.len(),
                draft: 0,
            };
            self.data.send(&head, Message::Input(input)).await?;
        }
        Ok((rx, guard))
    }

    /// Counts a streamed token and the time since the last one.
    fn count_token(&self, last_token_at: &mut Option<Instant>) {
        self.metrics
            .streamed_tokens
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = last_token_at.replace(Instant::now()) {
            self.metrics
                .token_latency
                .observe(t.elapsed().as_secs_f64());
        }
    }

    fn no_plan_reason(&self) -> RequestError {
        match &self.view.borrow().plan_error {
            Some(e) => RequestError::Unservable(e.clone()),
            None => RequestError::NoPlan,
        }
    }
}

/// Compiles a request's grammar once here, off the async threads, so a
/// schema that does not compile is the client's 400 before any stage
/// works on it (the last stage compiles it again for its masks).
async fn check_grammar(
    text: Arc<engine::text::TextModel>,
    c: Constraint,
) -> Result<(), RequestError> {
    let bad = |e: String| RequestError::BadInput(format!("response format: {e}"));
    tokio::task::spawn_blocking(move || text.grammars()?.guide(&c).map(drop))
        .await
        .map_err(|e| bad(e.to_string()))?
        .map_err(|e| bad(e.to_string()))
}

/// Frees the request along the chain when the origin is done with it, on
/// every path out (finished, failed, client gone).
struct RequestGuard {
    shared: Arc<Shared>,
    id: u64,
    head: String,
    /// The last stage (the one that sends its tokens).
    last: String,
    /// Stages of its plan.
    stages: usize,
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.shared.data.close_request(self.id);
        let shared = self.shared.clone();
        let (id, head) = (self.id, self.head.clone());
        tokio::spawn(async move {
            let _ = shared
                .data
                .send(&head, Message::Cancel { request_id: id })
                .await;
        });
    }
}
