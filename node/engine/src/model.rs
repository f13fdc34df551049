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
use sharding::{GgufFile, ModelConfig, ModelLayout, RopeStyle, TensorInfo};
use tracing::trace_span;

use crate::attention::{self, AttnShape};
use crate::ggml_ops;
use crate::kv_cache::KvCache;
use crate::linear::{Embedding, LinearGroup, WeightBytes};
use crate::EngineError;

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
    qkv: LinearGroup,
    qkv_bias: Option<[Tensor; 3]>,
    attn_out: LinearGroup,
    ffn_norm: Tensor,
    gate_up: LinearGroup,
    down: LinearGroup,
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
}

impl<'a> BatchSeq<'a> {
    /// `rows` new positions of the sequence cached in `cache`.
    pub fn new(cache: &'a mut KvCache, rows: usize, logits: LogitsFor) -> Self {
        BatchSeq {
            cache,
            rows,
            logits,
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
    /// The same tables as tensors on a GPU device (`None` on the CPU).
    device_rope: Option<(Tensor, Tensor)>,
    max_context: usize,
    weight_bytes: u64,
    spans: Vec<Arc<MappedSpan>>,
}

impl Stage {
    /// Loads layers `layers` of the model in `gguf`. Only the byte spans of
    /// this stage's tensors are mapped.
    pub fn load(
        gguf: &GgufFile,
        layout: &ModelLayout,
        layers: Range<usize>,
        opts: &LoadOptions,
    ) -> Result<Stage, EngineError> {
        let n_layers = layout.layers.len();
        if layers.start >= layers.end || layers.end > n_layers {
            return Err(EngineError::BadLayerRange {
                range: layers,
                n_layers,
            });
        }
        let tensors = layout.stage_tensors(layers.clone());
        let spans = map_spans(gguf, &tensors)?;
        let get = |info: &TensorInfo| -> WeightBytes {
            let span = spans
                .iter()
                .find(|s| s.contains(info))
                .expect("every stage tensor is mapped");
            WeightBytes::new(span.clone(), info.clone())
        };
        let dev = &opts.device;
        let first = layers.start == 0;
        let last = layers.end == n_layers;
        let embedding = first.then(|| Embedding::new(get(&layout.token_embd)));
        let mut blocks = Vec::with_capacity(layers.len());
        for l in &layout.layers[layers.clone()] {
            let t = |s: &str| get(l.tensor(s).expect("layout checked required tensors"));
            let bias = |s: &str| l.tensor(s).map(|i| get(i).to_f32_tensor(dev)).transpose();
            let qkv_bias = match (
                bias("attn_q.bias")?,
                bias("attn_k.bias")?,
                bias("attn_v.bias")?,
            ) {
                (Some(q), Some(k), Some(v)) => Some([q, k, v]),
                _ => None,
            };
            blocks.push(Block {
                attn_norm: t("attn_norm.weight").to_f32_tensor(dev)?,
                qkv: LinearGroup::new(
                    vec![t("attn_q.weight"), t("attn_k.weight"), t("attn_v.weight")],
                    dev,
                )?,
                qkv_bias,
                attn_out: LinearGroup::new(vec![t("attn_output.weight")], dev)?,
                ffn_norm: t("ffn_norm.weight").to_f32_tensor(dev)?,
                gate_up: LinearGroup::new(vec![t("ffn_gate.weight"), t("ffn_up.weight")], dev)?,
                down: LinearGroup::new(vec![t("ffn_down.weight")], dev)?,
            });
        }
        let head = if last {
            let out = layout.output.as_ref().unwrap_or(&layout.token_embd);
            Some(Head {
                norm: get(&layout.output_norm).to_f32_tensor(dev)?,
                output: LinearGroup::new(vec![get(out)], dev)?,
            })
        } else {
            None
        };
        let config = layout.config.clone();
        let max_context = opts.max_context.min(config.context_length).max(1);
        let freq_factors = match &layout.rope_freqs {
            Some(info) => Some(get(info).to_f32_tensor(&Device::Cpu)?.to_vec1::<f32>()?),
            None => None,
        };
        let half = config.head_dim / 2;
        let (cos_host, sin_host) = ggml_ops::rope_angles(
            max_context,
            half,
            config.rope_theta,
            1.0 / config.rope_scale,
            freq_factors.as_deref(),
        );
        let device_rope = if dev.is_cpu() {
            None
        } else {
            Some((
                Tensor::from_slice(&cos_host, (max_context, half), dev)?,
                Tensor::from_slice(&sin_host, (max_context, half), dev)?,
            ))
        };
        Ok(Stage {
            weight_bytes: tensors.iter().map(|t| t.size_bytes).sum(),
            config,
            layers,
            device: dev.clone(),
            embedding,
            blocks,
            head,
            cos_host,
            sin_host,
            device_rope,
            max_context,
            spans,
        })
    }

    /// Reads every mapped page once so the first request does not pay for
    /// disk reads; reports `(bytes_done, bytes_total)` as it goes.
    pub fn prefault(&self, progress: &mut dyn FnMut(u64, u64)) {
        const PAGE_BYTES: usize = 4096;
        const REPORT_BYTES: usize = 4 << 20;
        let total: u64 = self.spans.iter().map(|s| s.as_bytes().len() as u64).sum();
        let mut done = 0u64;
        let mut sink = 0u8;
        for span in &self.spans {
            for chunk in span.as_bytes().chunks(REPORT_BYTES) {
                sink ^= chunk.iter().step_by(PAGE_BYTES).fold(0u8, |a, &b| a ^ b);
                done += chunk.len() as u64;
                progress(done, total);
            }
        }
        std::hint::black_box(sink);
    }

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
    ) -> Result<StageOutput, EngineError> {
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
    ) -> Result<StageOutput, EngineError> {
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
    ) -> Result<StageOutput, EngineError> {
        let x = match input {
            StageInput::Tokens(ids) => {
                let emb = self.embedding.as_ref().ok_or(EngineError::NotFirstStage)?;
                if ids.is_empty() {
                    return Err(EngineError::EmptyInput);
                }
                emb.forward(ids, &self.device)?
            }
            StageInput::Hidden(h) => {
                if self.is_first() {
                    return Err(EngineError::FirstStageNeedsTokens);
                }
                let (t, dim) = h.dims2()?;
                if dim != self.config.dim || t == 0 || h.dtype() != DType::F32 {
                    return Err(EngineError::BadHidden {
                        shape: h.dims().to_vec(),
                        dim: self.config.dim,
                    });
                }
                h.to_device(&self.device)?
            }
        };
        let total = x.dim(0)?;
        if seqs.is_empty() || seqs.iter().any(|s| s.rows == 0) {
            return Err(EngineError::EmptyInput);
        }
        if seqs.iter().map(|s| s.rows).sum::<usize>() != total {
            return Err(EngineError::BadHidden {
                shape: x.dims().to_vec(),
                dim: self.config.dim,
            });
        }
        for s in seqs.iter() {
            let pos = s.cache.len();
            if pos + s.rows > s.cache.max_len() {
                return Err(EngineError::ContextFull {
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
        let mut x = x;
        for (i, block) in self.blocks.iter().enumerate() {
            let _span = trace_span!("layer", index = self.layers.start + i).entered();
            x = self.block_forward(block, &x, i, seqs, steps.as_deref())?;
        }
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
        Ok(StageOutput::Logits(head.output.forward_one(&x)?))
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
        if let Some(bias) = &b.qkv_bias {
            for (y, bias) in qkv.iter_mut().zip(bias) {
                *y = y.broadcast_add(bias)?;
            }
        }
        let [q, k, v]: [Tensor; 3] = qkv.try_into().expect("three projections");
        let y = match steps {
            None => self.attend_host(&q, &k, &v, layer, seqs)?,
            Some(steps) => {
                let mut outs = Vec::with_capacity(seqs.len());
                let mut offset = 0;
                for (s, step) in seqs.iter_mut().zip(steps) {
                    let t = s.rows;
                    let rows = |y: &Tensor| y.narrow(0, offset, t);
                    outs.push(self.attend_on_device(
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
        let x = (x + b.attn_out.forward_one(&y)?)?;
        let h = self.rms_norm(&x, &b.ffn_norm)?;
        let gu = b.gate_up.forward(&h)?;
        let m = self.swiglu(&gu[0], &gu[1])?;
        x + b.down.forward_one(&m)?
    }

    /// RoPE, cache append and attention on the CPU for every sequence of
    /// the batch; `q`, `k`, `v` are `[Σ rows, heads * head_dim]`. Sequences
    /// run in parallel: each reads only its own cache.
    fn attend_host(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        layer: usize,
        seqs: &mut [BatchSeq<'_>],
    ) -> candle_core::Result<Tensor> {
        let c = &self.config;
        let (nh, nkv, hd) = (c.n_heads, c.n_kv_heads, c.head_dim);
        let total = q.dim(0)?;
        let host = |y: &Tensor| y.contiguous()?.flatten_all()?.to_vec1::<f32>();
        let (q, k, v) = (host(q)?, host(k)?, host(v)?);
        let scale = 1.0 / (hd as f32).sqrt();
        let neox = c.rope_style == RopeStyle::Neox;
        let (cos, sin) = (&self.cos_host, &self.sin_host);
        let mut out = vec![0f32; total * nh * hd];
        // Each sequence's slice of the output, in batch order.
        let mut jobs = Vec::with_capacity(seqs.len());
        let (mut rest, mut offset) = (out.as_mut_slice(), 0);
        for s in seqs.iter_mut() {
            let rows = s.rows;
            let (mine, tail) = rest.split_at_mut(rows * nh * hd);
            jobs.push((offset, s, mine));
            rest = tail;
            offset += rows;
        }
        let run = |(offset, s, dst): (usize, &mut BatchSeq<'_>, &mut [f32])| {
            let (t, pos) = (s.rows, s.cache.len());
            let rows = offset..offset + t;
            let mut qh = heads_first(&q, rows.clone(), nh, hd);
            let mut kh = heads_first(&k, rows.clone(), nkv, hd);
            let vh = heads_first(&v, rows, nkv, hd);
            ggml_ops::rope_in_place(&mut qh, t, hd, pos, cos, sin, neox);
            ggml_ops::rope_in_place(&mut kh, t, hd, pos, cos, sin, neox);
            let (kb, vb, capacity) = s.cache.append_host(layer, &kh, &vh, nkv, hd);
            let shape = AttnShape {
                n_heads: nh,
                n_kv_heads: nkv,
                head_dim: hd,
                capacity,
            };
            attention::attend(shape, &qh, kb, vb, pos, scale, dst);
        };
        if jobs.len() == 1 {
            jobs.into_iter().for_each(run);
        } else {
            use rayon::prelude::*;
            jobs.into_par_iter().for_each(run);
        }
        Tensor::from_vec(out, (total, nh * hd), &self.device)
    }

    /// RMSNorm times weight; ggml's arithmetic on the CPU ([`ggml_ops`]).
    fn rms_norm(&self, x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
        if !self.device.is_cpu() {
            return candle_nn::ops::rms_norm(x, w, self.config.rms_eps);
        }
        let y = ggml_ops::rms_norm_mul(
            &x.flatten_all()?.to_vec1()?,
            &w.to_vec1()?,
            self.config.rms_eps,
        );
        Tensor::from_vec(y, x.shape(), &self.device)
    }

    /// `silu(gate) * up`; ggml's arithmetic on the CPU ([`ggml_ops`]).
    fn swiglu(&self, gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
        if !self.device.is_cpu() {
            return candle_nn::ops::silu(gate)? * up;
        }
        let y = ggml_ops::swiglu(
            &gate.flatten_all()?.to_vec1()?,
            &up.flatten_all()?.to_vec1()?,
        );
        Tensor::from_vec(y, gate.shape(), &self.device)
    }

    /// RoPE, cache append and attention of one sequence with candle ops
    /// on an f32 device cache (CUDA, Metal); `q`, `k`, `v` are its rows
    /// `[t, heads * head_dim]`.
    fn attend_on_device(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        layer: usize,
        cache: &mut KvCache,
        step: &DeviceStep,
    ) -> candle_core::Result<Tensor> {
        let c = &self.config;
        let (nh, nkv, hd) = (c.n_heads, c.n_kv_heads, c.head_dim);
        let t = q.dim(0)?;
        // [t, heads * hd] -> [1, heads, t, hd], the layout candle's rope wants.
        let heads_first =
            |y: &Tensor, n: usize| y.reshape((1, t, n, hd))?.transpose(1, 2)?.contiguous();
        let (q, k, v) = (
            heads_first(q, nh)?,
            heads_first(k, nkv)?,
            heads_first(v, nkv)?,
        );
        let (cos, sin) = (&step.cos, &step.sin);
        let (q, k) = match c.rope_style {
            RopeStyle::Interleaved => (
                candle_nn::rotary_emb::rope_i(&q, cos, sin)?,
                candle_nn::rotary_emb::rope_i(&k, cos, sin)?,
            ),
            RopeStyle::Neox => (
                candle_nn::rotary_emb::rope(&q, cos, sin)?,
                candle_nn::rotary_emb::rope(&k, cos, sin)?,
            ),
        };
        let scale = 1.0 / (hd as f64).sqrt();
        let mask = step.mask.as_ref();
        let (k_all, v_all) = cache.append(layer, &k.squeeze(0)?, &v.squeeze(0)?)?;
        let len = k_all.dim(1)?;
        // Grouped-query attention without copying K/V per query head: query
        // head h uses KV head h / rep, so the heads of one KV group are
        // adjacent and fold into the row dimension.
        let rep = nh / nkv;
        let q = q.reshape((nkv, rep * t, hd))?;
        let att = (q.matmul(&k_all.t()?)? * scale)?;
        let att = match mask {
            Some(m) => att
                .reshape((nkv, rep, t, len))?
                .broadcast_add(m)?
                .reshape((nkv, rep * t, len))?,
            None => att,
        };
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let y = att.matmul(&v_all)?;
        y.reshape((nh, t, hd))?
            .transpose(0, 1)?
            .reshape((t, nh * hd))
    }
}

/// Rows `rows` of a row-major `[_, n * hd]` matrix as `[n, rows.len(), hd]`.
fn heads_first(src: &[f32], rows: Range<usize>, n: usize, hd: usize) -> Vec<f32> {
    let t = rows.len();
    let width = n * hd;
    let mut out = vec![0f32; n * t * hd];
    for (i, r) in rows.enumerate() {
        let row = &src[r * width..(r + 1) * width];
        for h in 0..n {
            out[(h * t + i) * hd..][..hd].copy_from_slice(&row[h * hd..(h + 1) * hd]);
        }
    }
    out
}

/// `[t, pos + t]`: 0 where query `i` (at `pos + i`) may see key `j`, -inf after it.
fn causal_mask(t: usize, pos: usize, device: &Device) -> candle_core::Result<Tensor> {
    let len = pos + t;
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| (0..len).map(move |j| if j > pos + i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (t, len), device)
}

/// Maps the stage's tensors in as few spans as sensible: tensors closer than
/// [`SPAN_GAP_BYTES_MAX`] share a mapping, so a layer range is one mapping
/// while a distant embedding/head gets its own and the layers of other
/// stages are never mapped.
fn map_spans(
    gguf: &GgufFile,
    tensors: &[&TensorInfo],
) -> Result<Vec<Arc<MappedSpan>>, EngineError> {
    let mut ranges: Vec<(u64, u64)> = tensors
        .iter()
        .map(|t| (t.offset, t.offset + t.size_bytes))
        .collect();
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (s, e) in ranges {
        match merged.last_mut() {
            Some(last) if s <= last.1 + SPAN_GAP_BYTES_MAX => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    merged
        .into_iter()
        .map(|(s, e)| Ok(Arc::new(gguf.map_span(s, e)?)))
        .collect()
}

/// Gap between tensors below which two spans are mapped as one: small enough
/// that a neighbouring stage's layer (≥ a few MB in real models) never rides along.
const SPAN_GAP_BYTES_MAX: u64 = 256 * 1024;

/// Softmax over logits for tests and perplexity: `log p(token)` of row `row`.
pub fn log_prob(logits: &[f32], token: usize) -> f64 {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    logits[token] as f64 - max - sum.ln()
}
