//! A whole model on one machine: load it, turn prompts into tokens, generate
//! and score. `shoal run`, `shoal bench` and `shoal perplexity` stand on this;
//! the cluster replaces the single [`Stage`] with a pipeline of them.

use std::path::{Path, PathBuf};
use std::time::Instant;

use sharding::{GgufFile, ModelLayout};
use tracing::{debug_span, info};

use crate::chat::{ChatTemplate, Message};
use crate::model::{LoadOptions, LogitsFor, Stage, StageInput, StageOutput};
use crate::sampling::{Sampler, SamplingParams};
use crate::text::TextModel;
use crate::tokenizer::{StreamDecoder, Tokenizer};
use crate::{EngineError, KvCache, LoadError, PassError, TextError};
use schedule::speculate::{self, Speculation};

/// Prompts are fed in pieces of this many tokens (one home for the size:
/// the cluster's origins and the simulator cut prompts the same way).
pub use schedule::PROMPT_CHUNK_TOKENS;

/// Generation settings for one request.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// How to pick tokens.
    pub sampling: SamplingParams,
    /// Context window for this sequence (prompt + generation).
    pub context: usize,
    /// Speculate with prompt lookup (the same tokens, fewer passes when
    /// the answer repeats text): `Some(0)` adapts the proposal length to
    /// acceptance and cost, `Some(k)` always proposes up to `k`.
    pub speculate: Option<usize>,
    /// A grammar the answer follows (structured output).
    pub constraint: Option<protocol::Constraint>,
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The model produced an end-of-generation token.
    EndOfText,
    /// `max_tokens` reached.
    MaxTokens,
    /// The context window is full.
    ContextFull,
    /// The caller asked to stop.
    Cancelled,
    /// A stop sequence matched.
    StopSequence,
}

/// Timings of one generation, the numbers of `--verbose`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct GenerationStats {
    /// Prompt tokens processed.
    pub prompt_tokens: usize,
    /// Time to process the prompt.
    pub prompt_ms: f64,
    /// Tokens generated (including a final end-of-generation token).
    pub gen_tokens: usize,
    /// Time spent generating after the first token.
    pub gen_ms: f64,
    /// Time from start to the first generated token.
    pub ttft_ms: f64,
    /// Why it stopped.
    pub stop: StopReason,
    /// Tokens proposed by speculation.
    #[serde(default)]
    pub proposed: u64,
    /// Of those, accepted.
    #[serde(default)]
    pub accepted: u64,
}

impl GenerationStats {
    /// The stats line in llama.cpp's spirit:
    /// `prompt 12 tok, 350.2 tok/s | gen 64 tok, 88.1 tok/s | ttft 41 ms`.
    pub fn summary_line(&self) -> String {
        let rate = |n: usize, ms: f64| {
            if ms > 0.0 {
                n as f64 * 1000.0 / ms
            } else {
                0.0
            }
        };
        // The first generated token's time is in ttft, so gen speed counts the rest.
        let gen_timed = self.gen_tokens.saturating_sub(1);
        let mut line = format!(
            "prompt {} tok, {:.1} tok/s | gen {} tok, {:.1} tok/s | ttft {:.0} ms",
            self.prompt_tokens,
            rate(self.prompt_tokens, self.prompt_ms),
            self.gen_tokens,
            rate(gen_timed, self.gen_ms),
            self.ttft_ms
        );
        if self.proposed > 0 {
            line += &format!(" | draft {}/{} accepted", self.accepted, self.proposed);
        }
        line
    }
}

/// What the generation callback sees.
#[derive(Debug)]
pub enum GenerateEvent<'a> {
    /// A token and the text it completes (possibly empty mid-character).
    Token {
        /// The token id.
        id: u32,
        /// New complete UTF-8 text.
        text: &'a str,
    },
    /// Text left over at the end (an incomplete UTF-8 sequence, replaced).
    Tail {
        /// The text.
        text: &'a str,
    },
}

/// A model loaded whole on this machine.
pub struct Engine {
    path: PathBuf,
    layout: ModelLayout,
    stage: Stage,
    text: TextModel,
}

impl Engine {
    /// Loads every layer of the GGUF at `path`, reporting load progress.
    pub fn load(
        path: &Path,
        opts: &LoadOptions,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Engine, LoadError> {
        let gguf = GgufFile::open(path)?;
        let layout = ModelLayout::from_gguf(&gguf)?;
        let text = TextModel::from_gguf(&gguf)?;
        let stage = Stage::load(&gguf, &layout, 0..layout.layers.len(), opts)?;
        stage.prefault(progress);
        info!(
            model = layout.config.name.as_deref().unwrap_or("?"),
            layers = layout.layers.len(),
            weight_mib = stage.weight_bytes() >> 20,
            "model loaded"
        );
        // The parsed header (vocabulary arrays included) is dropped here:
        // everything needed was copied out, and it is megabytes.
        drop(gguf);
        release_freed_heap();
        Ok(Engine {
            path: path.to_path_buf(),
            layout,
            stage,
            text,
        })
    }

    /// The model file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The model's layout.
    pub fn layout(&self) -> &ModelLayout {
        &self.layout
    }

    /// The stage holding all layers.
    pub fn stage(&self) -> &Stage {
        &self.stage
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        self.text.tokenizer()
    }

    /// The chat template, if the GGUF has one.
    pub fn template(&self) -> Option<&ChatTemplate> {
        self.text.template()
    }

    /// Tokens of a chat conversation; see [`TextModel::chat_tokens`].
    pub fn chat_tokens(&self, messages: &[Message]) -> Result<Vec<u32>, TextError> {
        self.text.chat_tokens(messages)
    }

    /// Tokens of raw text (completion mode), with BOS if the model wants one.
    pub fn raw_tokens(&self, text: &str) -> Result<Vec<u32>, TextError> {
        self.text.raw_tokens(text)
    }

    /// A fresh per-sequence cache.
    pub fn new_cache(&self, context: usize) -> KvCache {
        self.stage.new_cache(context)
    }

    /// Feeds `tokens` to the model in chunks and returns the logits of the last one.
    pub fn prefill(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<f32>, PassError> {
        if tokens.is_empty() {
            return Err(PassError::EmptyInput);
        }
        if cache.len() + tokens.len() > cache.max_len() {
            return Err(PassError::ContextFull {
                needed: cache.len() + tokens.len(),
                max: cache.max_len(),
            });
        }
        let mut last = None;
        for chunk in tokens.chunks(PROMPT_CHUNK_TOKENS) {
            last = Some(self.step(chunk, cache, LogitsFor::Last)?);
        }
        Ok(last.expect("non-empty").to_vec1()?)
    }

    /// One forward pass over `tokens`; logits `[rows, vocab]`.
    pub fn step(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        want: LogitsFor,
    ) -> Result<candle_core::Tensor, PassError> {
        match self
            .stage
            .forward(StageInput::Tokens(tokens), cache, want)?
        {
            StageOutput::Logits(l) => Ok(if want == LogitsFor::Last {
                l.squeeze(0)?
            } else {
                l
            }),
            StageOutput::Hidden(_) => unreachable!("a whole-model stage ends with logits"),
        }
    }

    /// Generates from `prompt` in a fresh sequence; see [`Engine::generate_in`].
    pub fn generate(
        &self,
        prompt: &[u32],
        opts: &GenerateOptions,
        on_event: &mut dyn FnMut(GenerateEvent<'_>) -> bool,
    ) -> Result<GenerationStats, EngineError> {
        let mut session = Session::new(self.new_cache(opts.context));
        self.generate_in(&mut session, prompt, opts, on_event)
    }

    /// Generates from `prompt` (the whole conversation so far) in `session`,
    /// reusing the cached positions of the longest common prefix with what
    /// the session already processed: a chat turn only pays for its new
    /// tokens. `on_event` returns `false` to stop early.
    pub fn generate_in(
        &self,
        session: &mut Session,
        prompt: &[u32],
        opts: &GenerateOptions,
        on_event: &mut dyn FnMut(GenerateEvent<'_>) -> bool,
    ) -> Result<GenerationStats, EngineError> {
        let _span = debug_span!("generate", prompt_tokens = prompt.len()).entered();
        let start = Instant::now();
        let cache = &mut session.cache;
        if prompt.is_empty() {
            return Err(PassError::EmptyInput.into());
        }
        if prompt.len() >= cache.max_len() {
            return Err(PassError::ContextFull {
                needed: prompt.len() + 1,
                max: cache.max_len(),
            }
            .into());
        }
        // Keep at least one prompt token to run: its logits pick the first reply token.
        let reuse = common_prefix(&session.tokens, prompt).min(prompt.len() - 1);
        cache.truncate(reuse);
        session.tokens.truncate(reuse);
        let mut sampler = Sampler::new(opts.sampling.clone());
        let mut logits = self.prefill(&prompt[reuse..], cache)?;
        session.tokens.extend_from_slice(&prompt[reuse..]);
        let mut progress = Progress::new(prompt.len() - reuse, start);
        let mut guide = match &opts.constraint {
            None => None,
            Some(c) => Some(
                self.text
                    .grammars()
                    .and_then(|g| g.guide(c))
                    .map_err(TextError::from)?,
            ),
        };
        // Speculation (prompt lookup) keeps the tokens: see
        // `schedule::speculate`. Not with a grammar yet (its state would
        // have to roll back with the rejected proposals).
        let mut spec = opts
            .speculate
            .filter(|_| guide.is_none())
            .map(Speculation::new);
        // A token drawn while verifying proposals: the next one out.
        let mut pending: Option<u32> = None;
        loop {
            let id = match pending.take() {
                Some(t) => t,
                None => {
                    if let Some(g) = &mut guide {
                        g.mask(&mut logits).map_err(TextError::from)?;
                    }
                    let id = sampler.sample(&logits, &session.tokens);
                    if let Some(g) = &mut guide {
                        g.advance(id).map_err(TextError::from)?;
                    }
                    id
                }
            };
            let room = cache.len() < cache.max_len();
            if !progress.on_token(self.text.tokenizer(), id, opts.max_tokens, room, on_event) {
                break;
            }
            session.tokens.push(id);
            let fits = cache.max_len() - cache.len() - 1;
            let k = spec.as_mut().map_or(0, Speculation::length).min(fits);
            let drafts = speculate::prompt_lookup(&session.tokens, k);
            let timer = Instant::now();
            if drafts.is_empty() {
                logits = self
                    .step(&[id], cache, LogitsFor::Last)?
                    .to_vec1()
                    .map_err(PassError::from)?;
                if let Some(s) = &mut spec {
                    s.timed_step(timer.elapsed().as_secs_f64() * 1e6);
                }
                continue;
            }
            let (n, next) = self.verify(id, &drafts, cache, &mut sampler, &mut session.tokens)?;
            if let Some(s) = &mut spec {
                s.verified(drafts.len(), n, timer.elapsed().as_secs_f64() * 1e6);
            }
            progress.speculated(drafts.len(), n);
            let tok = self.text.tokenizer();
            if !drafts[..n]
                .iter()
                .all(|&d| progress.on_token(tok, d, opts.max_tokens, true, on_event))
            {
                break;
            }
            pending = Some(next);
        }
        Ok(progress.finish(on_event))
    }

    /// Runs `id` and the proposals `drafts` in one pass and draws at each
    /// position as a plain step would; keeps the proposals that match the
    /// draws (in `session` and the cache) and returns how many, and the
    /// token drawn after them.
    fn verify(
        &self,
        id: u32,
        drafts: &[u32],
        cache: &mut KvCache,
        sampler: &mut Sampler,
        session_tokens: &mut Vec<u32>,
    ) -> Result<(usize, u32), EngineError> {
        let mut input = Vec::with_capacity(drafts.len() + 1);
        input.push(id);
        input.extend_from_slice(drafts);
        // Each row summed as a one-token step (the same bits as decoding
        // the proposals one by one).
        let seq = crate::BatchSeq::new(cache, input.len(), LogitsFor::All).as_steps();
        let StageOutput::Logits(logits) = self
            .stage
            .forward_batch(StageInput::Tokens(&input), &mut [seq])?
        else {
            unreachable!("a whole-model stage ends with logits")
        };
        let rows = logits.to_vec2::<f32>().map_err(PassError::from)?;
        let mut n = 0;
        let next = loop {
            let t = sampler.sample(&rows[n], session_tokens);
            if n < drafts.len() && t == drafts[n] {
                session_tokens.push(t);
                n += 1;
            } else {
                break t;
            }
        };
        cache.truncate(session_tokens.len());
        Ok((n, next))
    }
}

/// The bookkeeping of one generation — stop conditions, streaming text,
/// timings — shared by the engine and the cluster's request origin so both
/// stop, stream and count alike.
pub struct Progress {
    stats: GenerationStats,
    decoder: StreamDecoder,
    start: Instant,
    first_at: Option<Instant>,
}

impl Progress {
    /// Starts counting once `prompt_tokens` were processed (the prompt time
    /// ends now).
    pub fn new(prompt_tokens: usize, start: Instant) -> Progress {
        Progress {
            stats: GenerationStats {
                prompt_tokens,
                prompt_ms: ms_since(start),
                gen_tokens: 0,
                gen_ms: 0.0,
                ttft_ms: 0.0,
                stop: StopReason::MaxTokens,
                proposed: 0,
                accepted: 0,
            },
            decoder: StreamDecoder::new(),
            start,
            first_at: None,
        }
    }

    /// Takes a sampled token: streams its text and says whether to feed it
    /// back for another one (`room`: the context has space for it).
    pub fn on_token(
        &mut self,
        tokenizer: &Tokenizer,
        id: u32,
        max_tokens: usize,
        room: bool,
        on_event: &mut dyn FnMut(GenerateEvent<'_>) -> bool,
    ) -> bool {
        if self.stats.gen_tokens >= max_tokens {
            return false;
        }
        self.stats.gen_tokens += 1;
        if self.first_at.is_none() {
            self.first_at = Some(Instant::now());
            self.stats.ttft_ms = ms_since(self.start);
        }
        if tokenizer.is_eog(id) {
            self.stats.stop = StopReason::EndOfText;
            return false;
        }
        let text = self.decoder.push(tokenizer, id);
        if !on_event(GenerateEvent::Token { id, text: &text }) {
            self.stats.stop = StopReason::Cancelled;
            return false;
        }
        if self.stats.gen_tokens == max_tokens {
            return false;
        }
        if !room {
            self.stats.stop = StopReason::ContextFull;
            return false;
        }
        true
    }

    /// Counts a round of speculation: `proposed` tokens, `accepted` stood.
    pub fn speculated(&mut self, proposed: usize, accepted: usize) {
        self.stats.proposed += proposed as u64;
        self.stats.accepted += accepted as u64;
    }

    /// Flushes the text left and returns the stats.
    pub fn finish(
        mut self,
        on_event: &mut dyn FnMut(GenerateEvent<'_>) -> bool,
    ) -> GenerationStats {
        let rest = self.decoder.finish();
        if !rest.is_empty() {
            on_event(GenerateEvent::Tail { text: &rest });
        }
        self.stats.gen_ms = self.first_at.map_or(0.0, ms_since);
        self.stats
    }
}

/// One conversation's state: its cache and the tokens the cache holds.
pub struct Session {
    cache: KvCache,
    tokens: Vec<u32>,
}

impl Session {
    /// A session over an empty cache.
    pub fn new(cache: KvCache) -> Self {
        Session {
            cache,
            tokens: Vec::new(),
        }
    }

    /// Tokens processed so far.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Hands memory freed while loading (header arrays, tokenizer build
/// scratch, ~10 MB) back to the OS, so resident memory after loading is the
/// weights plus what is really kept.
pub fn release_freed_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}
