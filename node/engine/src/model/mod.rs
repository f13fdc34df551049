//! The llama forward pass over a contiguous range of layers: a pipeline stage.
//!
//! A [`Stage`] owns the weights of layers `[start, end)`; the first stage
//! also owns the token embedding, the last the final norm and LM head (the
//! embedding again when tied). Between stages only hidden states `[t, dim]`
//! travel, so running `[0, k)` then `[k, n)` is the same computation as
//! `[0, n)` — the property the pipeline is built on, and tested as such.
//!
//! Sequences are independent: the stage holds no per-request state; each
//! sequence brings its own [`KvCache`]. Batching many sequences through one
//! stage therefore needs only a loop (or concatenated matmuls) on top.

use std::ops::Range;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use sharding::gguf::MappedSpan;
use sharding::{Activation, GgufFile, ModelConfig, ModelLayout, RopeStyle, TensorInfo};
use tracing::trace_span;

use crate::attention::{self, AttnShape};
use crate::ggml_ops;
use crate::kv_cache::KvCache;
use crate::linear::{Embedding, LinearGroup, WeightBytes};
use crate::quant;
use crate::{LoadError, PassError};

mod attend;
mod load;
mod moe;

use attend::causal_mask;

/// How a stage is loaded.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Where the weights and compute live.
    pub device: Device,
    /// Most positions any sequence may reach; sizes the RoPE tables.
    /// Capped at the model's trained context length.
    pub max_context: usize,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            device: Device::Cpu,
            max_context: 4096,
        }
    }
}

/// What enters a stage.
#[derive(Debug)]
pub enum StageInput<'a> {
    /// Token ids (first stage only).
    Tokens(&'a [u32]),
    /// Hidden states `[t, dim]` from the previous stage.
    Hidden(Tensor),
}

/// Which positions the last stage turns into logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsFor {
    /// Only the last position (generation).
    Last,
    /// Every position (perplexity, prompt scoring).
    All,
}

/// What leaves a stage.
#[derive(Debug)]
pub enum StageOutput {
    /// Hidden states `[t, dim]` for the next stage.
    Hidden(Tensor),
    /// Logits `[rows, vocab]` from the last stage.
    Logits(Tensor),
}

struct Block {
    attn_norm: Tensor,
    /// q, k, v (three matrices, or Phi-3's one fused matrix).
    qkv: LinearGroup,
    qkv_bias: Option<[Tensor; 3]>,
    /// Per-head RMSNorm weights of q and k (Qwen3, Gemma 3), on the host.
    qk_norm: Option<(Vec<f32>, Vec<f32>)>,
    attn_out: LinearGroup,
    post_attn_norm: Option<Tensor>,
    ffn_norm: Tensor,
    ffn: Ffn,
    post_ffn_norm: Option<Tensor>,
    /// Keys a query sees on a sliding-window layer.
    window: Option<usize>,
}

/// The feed-forward of a block.
enum Ffn {
    /// gate and up (two matrices, or Phi-3's one fused matrix), then down.
    Dense {
        gate_up: LinearGroup,
        down: LinearGroup,
    },
    /// A routed mixture of experts.
    Experts(moe::MoeFfn),
}

/// Per-forward inputs of the device (candle-op) attention path.
struct DeviceStep {
    /// RoPE rows for the step's positions.
    cos: Tensor,
    sin: Tensor,
    /// Causal mask `[t, pos + t]` when the step has several rows.
    mask: Option<Tensor>,
}

struct Head {
    norm: Tensor,
    output: LinearGroup,
}

/// One sequence's part in a batched forward ([`Stage::forward_batch`]).
pub struct BatchSeq<'a> {
    /// The sequence's cache on this stage; grows by `rows`.
    pub cache: &'a mut KvCache,
    /// How many of the batch's rows are this sequence's (consecutive).
    pub rows: usize,
    /// Which of its rows the last stage turns into logits.
    pub logits: LogitsFor,
    /// Each row summed as a one-row step of its own (tokens to verify: their
    /// logits must be the bits decoding them one by one would give, and the
    /// K types sum a row of a chunk in another order than a lone row).
    pub steps: bool,
}

impl<'a> BatchSeq<'a> {
    /// `rows` new positions of the sequence cached in `cache`.
    pub fn new(cache: &'a mut KvCache, rows: usize, logits: LogitsFor) -> Self {
        BatchSeq {
            cache,
            rows,
            logits,
            steps: false,
        }
    }

    /// The same, its rows summed as one-row steps ([`BatchSeq::steps`]).
    pub fn as_steps(mut self) -> Self {
        self.steps = true;
        self
    }

    /// The row groups of this sequence a product sums as one chunk each:
    /// `n` rows as one chunk, or as `n` one-row steps.
    fn chunks(&self, n: usize, out: &mut Vec<usize>) {
        if self.steps {
            out.extend(std::iter::repeat_n(1, n));
        } else {
            out.push(n);
        }
    }
}

/// Layers `[start, end)` of a llama-family model, ready to run.
pub struct Stage {
    config: ModelConfig,
    layers: Range<usize>,
    device: Device,
    embedding: Option<Embedding>,
    blocks: Vec<Block>,
    head: Option<Head>,
    /// RoPE tables `[max_context, head_dim / 2]`, as the CPU path reads them.
    cos_host: Vec<f32>,
    sin_host: Vec<f32>,
    /// The tables of sliding-window layers when their RoPE base differs.
    rope_local: Option<(Vec<f32>, Vec<f32>)>,
    /// The same tables as tensors on a GPU device (`None` on the CPU).
    device_rope: Option<(Tensor, Tensor)>,
    max_context: usize,
    weight_bytes: u64,
    spans: Vec<Arc<MappedSpan>>,
}

impl Stage {
    /// The model's hyperparameters.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The layers this stage runs.
    pub fn layers(&self) -> Range<usize> {
        self.layers.clone()
    }

    /// Whether this stage embeds tokens.
    pub fn is_first(&self) -> bool {
        self.embedding.is_some()
    }

    /// Whether this stage produces logits.
    pub fn is_last(&self) -> bool {
        self.head.is_some()
    }

    /// The most positions a sequence may reach on this stage.
    pub fn max_context(&self) -> usize {
        self.max_context
    }

    /// Bytes of weights this stage holds.
    pub fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }

    /// The device it runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// A fresh cache for one sequence, holding up to `max_len` positions
    /// (capped at [`Stage::max_context`]).
    pub fn new_cache(&self, max_len: usize) -> KvCache {
        KvCache::new(self.blocks.len(), max_len.min(self.max_context))
    }

    /// Runs the stage on `t` new positions of one sequence, appending to its cache.
    pub fn forward(
        &self,
        input: StageInput<'_>,
        cache: &mut KvCache,
        logits: LogitsFor,
    ) -> Result<StageOutput, PassError> {
        let rows = match &input {
            StageInput::Tokens(ids) => ids.len(),
            StageInput::Hidden(h) => h.dim(0)?,
        };
        self.forward_batch(input, &mut [BatchSeq::new(cache, rows, logits)])
    }

    /// Runs one step of several sequences together (continuous batching).
    ///
    /// `input` holds the new rows of every sequence of `seqs`, one after the
    /// other in that order. The projections and the feed-forward run once
    /// over all rows — each weight block is read once per step instead of
    /// once per sequence, which is what makes many streams cheaper than one
    /// at a time — while RoPE and attention run per sequence on its own
    /// cache. Every row's arithmetic is the same as in a one-sequence
    /// forward, so batching never changes a sequence's outputs.
    ///
    /// Returns hidden states `[Σ rows, dim]`, or on the last stage logits
    /// for each sequence in order (one row for [`LogitsFor::Last`], all its
    /// rows for [`LogitsFor::All`]). On error no cache has advanced.
    pub fn forward_batch(
        &self,
        input: StageInput<'_>,
        seqs: &mut [BatchSeq<'_>],
    ) -> Result<StageOutput, PassError> {
        // Every matmul and many candle ops fan out on rayon's pool. Called
        // from outside the pool, each of those hundreds of calls per token
        // would hand work to a pool thread and sleep on a latch; running the
        // whole pass on a pool thread makes them direct calls (and, with
        // one thread, inline).
        if rayon::current_thread_index().is_none() {
            return rayon::scope(|_| self.forward_on_pool(input, seqs));
        }
        self.forward_on_pool(input, seqs)
    }

    fn forward_on_pool(
        &self,
        input: StageInput<'_>,
        seqs: &mut [BatchSeq<'_>],
    ) -> Result<StageOutput, PassError> {
        let x = match input {
            StageInput::Tokens(ids) => {
                let emb = self.embedding.as_ref().ok_or(PassError::NotFirstStage)?;
                if ids.is_empty() {
                    return Err(PassError::EmptyInput);
                }
                let x = emb.forward(ids, &self.device)?;
                match self.config.embed_scale {
                    Some(s) => self.host_map(&x, |v| ggml_ops::scale(v, s))?,
                    None => x,
                }
            }
            StageInput::Hidden(h) => {
                if self.is_first() {
                    return Err(PassError::FirstStageNeedsTokens);
                }
                let (t, dim) = h.dims2()?;
                if dim != self.config.dim || t == 0 || h.dtype() != DType::F32 {
                    return Err(PassError::BadHidden {
                        shape: h.dims().to_vec(),
                        dim: self.config.dim,
                    });
                }
                all_finite(&h, "hidden states received")?;
                h.to_device(&self.device)?
            }
        };
        let total = x.dim(0)?;
        if seqs.is_empty() || seqs.iter().any(|s| s.rows == 0) {
            return Err(PassError::EmptyInput);
        }
        if seqs.iter().map(|s| s.rows).sum::<usize>() != total {
            return Err(PassError::BadHidden {
                shape: x.dims().to_vec(),
                dim: self.config.dim,
            });
        }
        for s in seqs.iter() {
            let pos = s.cache.len();
            if pos + s.rows > s.cache.max_len() {
                return Err(PassError::ContextFull {
                    needed: pos + s.rows,
                    max: s.cache.max_len(),
                });
            }
        }
        // RoPE rows and the causal mask of each sequence for the device
        // path; the CPU path reads the host tables and masks by
        // construction (each row reads keys up to itself).
        let steps = match &self.device_rope {
            Some((cos, sin)) => Some(
                seqs.iter()
                    .map(|s| {
                        let (pos, t) = (s.cache.len(), s.rows);
                        Ok(DeviceStep {
                            cos: cos.narrow(0, pos, t)?,
                            sin: sin.narrow(0, pos, t)?,
                            mask: if t > 1 {
                                Some(causal_mask(t, pos, &self.device)?)
                            } else {
                                None
                            },
                        })
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?,
            ),
            None => None,
        };
        // Each sequence's rows summed as its chunk alone would be (the K
        // types' float order depends on the rows of a product).
        let mut rows = Vec::with_capacity(seqs.len());
        for s in seqs.iter() {
            s.chunks(s.rows, &mut rows);
        }
        let x = quant::with_sequence_rows(&rows, || {
            let mut x = x;
            for (i, block) in self.blocks.iter().enumerate() {
                let _span = trace_span!("layer", index = self.layers.start + i).entered();
                x = self.block_forward(block, &x, i, seqs, steps.as_deref())?;
            }
            Ok::<_, PassError>(x)
        })?;
        for s in seqs.iter_mut() {
            s.cache.advance(s.rows);
        }
        let Some(head) = &self.head else {
            return Ok(StageOutput::Hidden(x));
        };
        let x = if seqs.iter().all(|s| s.logits == LogitsFor::All) {
            x
        } else {
            let mut parts = Vec::with_capacity(seqs.len());
            let mut offset = 0;
            for s in seqs.iter() {
                parts.push(match s.logits {
                    LogitsFor::Last => x.narrow(0, offset + s.rows - 1, 1)?,
                    LogitsFor::All => x.narrow(0, offset, s.rows)?,
                });
                offset += s.rows;
            }
            if parts.len() == 1 {
                parts.pop().expect("one part")
            } else {
                Tensor::cat(&parts, 0)?
            }
        };
        let x = self.rms_norm(&x, &head.norm)?;
        let mut head_rows = Vec::with_capacity(seqs.len());
        for s in seqs.iter() {
            let n = match s.logits {
                LogitsFor::Last => 1,
                LogitsFor::All => s.rows,
            };
            s.chunks(n, &mut head_rows);
        }
        let logits = quant::with_sequence_rows(&head_rows, || head.output.forward_one(&x))?;
        all_finite(&logits, "logits")?;
        Ok(StageOutput::Logits(match self.config.final_softcap {
            // ggml: scale by 1/cap, tanh, scale by cap.
            Some(cap) => self.host_map(&logits, |v| {
                v.iter_mut()
                    .for_each(|x| *x = (*x * (1.0 / cap)).tanh() * cap)
            })?,
            None => logits,
        }))
    }

    fn block_forward(
        &self,
        b: &Block,
        x: &Tensor,
        layer: usize,
        seqs: &mut [BatchSeq<'_>],
        steps: Option<&[DeviceStep]>,
    ) -> candle_core::Result<Tensor> {
        let h = self.rms_norm(x, &b.attn_norm)?;
        let mut qkv = b.qkv.forward(&h)?;
        if qkv.len() == 1 {
            // One fused matrix: its output columns are q, then k, then v.
            let c = &self.config;
            let fused = qkv.pop().expect("one output");
            let (q_dim, kv_dim) = (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
            qkv = vec![
                fused.narrow(1, 0, q_dim)?,
                fused.narrow(1, q_dim, kv_dim)?,
                fused.narrow(1, q_dim + kv_dim, kv_dim)?,
            ];
        }
        if let Some(bias) = &b.qkv_bias {
            for (y, bias) in qkv.iter_mut().zip(bias) {
                *y = y.broadcast_add(bias)?;
            }
        }
        let [q, k, v]: [Tensor; 3] = qkv.try_into().expect("three projections");
        let y = match steps {
            None => self.attend_host(b, &q, &k, &v, layer, seqs)?,
            Some(steps) => {
                let mut outs = Vec::with_capacity(seqs.len());
                let mut offset = 0;
                for (s, step) in seqs.iter_mut().zip(steps) {
                    let t = s.rows;
                    let rows = |y: &Tensor| y.narrow(0, offset, t);
                    outs.push(self.attend_on_device(
                        b,
                        &rows(&q)?,
                        &rows(&k)?,
                        &rows(&v)?,
                        layer,
                        s.cache,
                        step,
                    )?);
                    offset += t;
                }
                if outs.len() == 1 {
                    outs.pop().expect("one sequence")
                } else {
                    Tensor::cat(&outs, 0)?
                }
            }
        };
        let mut y = b.attn_out.forward_one(&y)?;
        if let Some(norm) = &b.post_attn_norm {
            y = self.rms_norm(&y, norm)?;
        }
        let x = (x + y)?;
        let h = self.rms_norm(&x, &b.ffn_norm)?;
        let mut y = match &b.ffn {
            Ffn::Dense { gate_up, down } => {
                let mut gu = gate_up.forward(&h)?;
                if gu.len() == 1 {
                    // Phi-3's fused matrix: gate columns, then up.
                    let fused = gu.pop().expect("one output");
                    let f = self.config.ffn_dim;
                    gu = vec![fused.narrow(1, 0, f)?, fused.narrow(1, f, f)?];
                }
                down.forward_one(&self.activate(&gu[0], &gu[1])?)?
            }
            Ffn::Experts(experts) => experts.forward(self, &h)?,
        };
        if let Some(norm) = &b.post_ffn_norm {
            y = self.rms_norm(&y, norm)?;
        }
        x + y
    }
}

/// Softmax over logits for tests and perplexity: `log p(token)` of row `row`.
pub fn log_prob(logits: &[f32], token: usize) -> f64 {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    logits[token] as f64 - max - sum.ln()
}

/// Fails with [`PassError::NonFinite`] when `t` holds a NaN or an infinity.
fn all_finite(t: &Tensor, what: &'static str) -> Result<(), PassError> {
    // A copy of rows × (hidden size or vocabulary) floats: small next to the pass.
    let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    if values.iter().all(|v| v.is_finite()) {
        Ok(())
    } else {
        Err(PassError::NonFinite { what })
    }
}
