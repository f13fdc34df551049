//! Loading a stage: its tensors mapped from the GGUF in as few spans as
//! sensible, prefaulted so the first request does not pay for page faults.

use super::*;

impl Stage {
    /// Loads layers `layers` of the model in `gguf`. Only the byte spans of
    /// this stage's tensors are mapped.
    pub fn load(
        gguf: &GgufFile,
        layout: &ModelLayout,
        layers: Range<usize>,
        opts: &LoadOptions,
    ) -> Result<Stage, LoadError> {
        let n_layers = layout.layers.len();
        if layers.start >= layers.end || layers.end > n_layers {
            return Err(LoadError::BadLayerRange {
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
        let c = &layout.config;
        for l in &layout.layers[layers.clone()] {
            let t = |s: &str| get(l.tensor(s).expect("layout checked required tensors"));
            let opt = |s: &str| l.tensor(s).map(get);
            let norm = |s: &str| opt(s).map(|w| w.to_f32_tensor(dev)).transpose();
            let bias = |s: &str| opt(s).map(|w| w.to_f32_tensor(dev)).transpose();
            let qkv_bias = match (
                bias("attn_q.bias")?,
                bias("attn_k.bias")?,
                bias("attn_v.bias")?,
            ) {
                (Some(q), Some(k), Some(v)) => Some([q, k, v]),
                _ => None,
            };
            let qkv = if c.fused {
                vec![t("attn_qkv.weight")]
            } else {
                vec![t("attn_q.weight"), t("attn_k.weight"), t("attn_v.weight")]
            };
            let qk_norm = if c.qk_norm {
                let host = |s: &str| t(s).to_f32_tensor(&Device::Cpu)?.to_vec1::<f32>();
                Some((host("attn_q_norm.weight")?, host("attn_k_norm.weight")?))
            } else {
                None
            };
            let ffn = match &c.experts {
                Some(spec) => Ffn::Experts(moe::MoeFfn::new(
                    *spec,
                    t("ffn_gate_inp.weight"),
                    t("ffn_gate_exps.weight"),
                    t("ffn_up_exps.weight"),
                    t("ffn_down_exps.weight"),
                    dev,
                )?),
                None => Ffn::Dense {
                    gate_up: if c.fused {
                        LinearGroup::new(vec![t("ffn_up.weight")], dev)?
                    } else {
                        LinearGroup::new(vec![t("ffn_gate.weight"), t("ffn_up.weight")], dev)?
                    },
                    down: LinearGroup::new(vec![t("ffn_down.weight")], dev)?,
                },
            };
            let window = c
                .sliding_window
                .as_ref()
                .filter(|sw| sw.layers.get(l.index).copied().unwrap_or(false))
                .map(|sw| sw.window);
            blocks.push(Block {
                attn_norm: t("attn_norm.weight").to_f32_tensor(dev)?,
                qkv: LinearGroup::new(qkv, dev)?,
                qkv_bias,
                qk_norm,
                attn_out: LinearGroup::new(vec![t("attn_output.weight")], dev)?,
                post_attn_norm: norm("post_attention_norm.weight")?,
                ffn_norm: t("ffn_norm.weight").to_f32_tensor(dev)?,
                ffn,
                post_ffn_norm: norm("post_ffw_norm.weight")?,
                window,
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
        // Sliding-window layers with their own RoPE base (Gemma 3) get
        // their own tables.
        let rope_local = match &config.sliding_window {
            Some(sw) if sw.rope_theta != config.rope_theta => Some(ggml_ops::rope_angles(
                max_context,
                half,
                sw.rope_theta,
                1.0,
                freq_factors.as_deref(),
            )),
            _ => None,
        };
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
            rope_local,
            device_rope,
            max_context,
            spans,
        })
    }

    /// Reads every mapped page once so the first request does not pay for
    /// disk reads; reports `(bytes_done, bytes_total)` as it goes.
    ///
    /// A mixture of experts is left mapped, not read: each token touches
    /// only the experts it runs, and reading them all would make resident
    /// what most requests never use.
    pub fn prefault(&self, progress: &mut dyn FnMut(u64, u64)) {
        if self.config.experts.is_some() {
            return;
        }
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
}

fn map_spans(gguf: &GgufFile, tensors: &[&TensorInfo]) -> Result<Vec<Arc<MappedSpan>>, LoadError> {
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
