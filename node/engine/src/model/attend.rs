//! Attention and the small ops around it: on the host with ggml's
//! arithmetic (f16 cache), or on a device through candle.

use super::*;

impl Stage {
    /// RoPE, cache append and attention on the CPU for every sequence of
    /// the batch; `q`, `k`, `v` are `[Σ rows, heads * head_dim]`. Sequences
    /// run in parallel: each reads only its own cache.
    pub(super) fn attend_host(
        &self,
        b: &Block,
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
        let (mut q, mut k, v) = (host(q)?, host(k)?, host(v)?);
        if let Some((qn, kn)) = &b.qk_norm {
            q = ggml_ops::rms_norm_mul(&q, qn, c.rms_eps);
            k = ggml_ops::rms_norm_mul(&k, kn, c.rms_eps);
        }
        let neox = c.rope_style == RopeStyle::Neox;
        let (cos, sin) = match (&self.rope_local, b.window) {
            (Some((cos, sin)), Some(_)) => (cos, sin),
            _ => (&self.cos_host, &self.sin_host),
        };
        // Gemma and Phi-3 scale q after RoPE and attend with scale 1.
        let scale = if c.scale_q { 1.0 } else { c.attn_scale };
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
            if c.scale_q {
                ggml_ops::scale(&mut qh, c.attn_scale);
            }
            let (kb, vb, capacity) = s.cache.append_host(layer, &kh, &vh, nkv, hd);
            let shape = AttnShape {
                n_heads: nh,
                n_kv_heads: nkv,
                head_dim: hd,
                capacity,
                window: b.window,
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
    pub(super) fn rms_norm(&self, x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
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

    /// `act(gate) * up` with the model's activation; ggml's arithmetic on
    /// the CPU ([`ggml_ops`]).
    pub(super) fn activate(&self, gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
        let gelu = self.config.activation == Activation::GeGlu;
        if !self.device.is_cpu() {
            let a = if gelu {
                gate.gelu()?
            } else {
                candle_nn::ops::silu(gate)?
            };
            return a * up;
        }
        let (g, u) = (gate.flatten_all()?.to_vec1()?, up.flatten_all()?.to_vec1()?);
        let y = if gelu {
            ggml_ops::geglu(&g, &u)
        } else {
            ggml_ops::swiglu(&g, &u)
        };
        Tensor::from_vec(y, gate.shape(), &self.device)
    }

    /// `x` with `f` applied to its values on the host (small element-wise
    /// steps that must round as ggml's do).
    pub(super) fn host_map(
        &self,
        x: &Tensor,
        f: impl FnOnce(&mut [f32]),
    ) -> candle_core::Result<Tensor> {
        let mut v = x.flatten_all()?.to_vec1::<f32>()?;
        f(&mut v);
        Tensor::from_vec(v, x.shape(), x.device())
    }

    /// RoPE, cache append and attention of one sequence with candle ops
    /// on an f32 device cache (CUDA, Metal); `q`, `k`, `v` are its rows
    /// `[t, heads * head_dim]`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attend_on_device(
        &self,
        b: &Block,
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
        let (mut q, mut k, v) = (
            heads_first(q, nh)?,
            heads_first(k, nkv)?,
            heads_first(v, nkv)?,
        );
        if let Some((qn, kn)) = &b.qk_norm {
            let dev = q.device().clone();
            q = candle_nn::ops::rms_norm(&q, &Tensor::from_slice(qn, hd, &dev)?, c.rms_eps)?;
            k = candle_nn::ops::rms_norm(&k, &Tensor::from_slice(kn, hd, &dev)?, c.rms_eps)?;
        }
        if b.window.is_some() && self.rope_local.is_some() {
            candle_core::bail!(
                "sliding-window layers with their own RoPE base run on the CPU only"
            );
        }
        if let Some(w) = b.window {
            if cache.len() + t > w {
                candle_core::bail!(
                    "sliding-window attention past {w} positions runs on the CPU only"
                );
            }
        }
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
        let scale = c.attn_scale as f64;
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
pub(super) fn heads_first(src: &[f32], rows: Range<usize>, n: usize, hd: usize) -> Vec<f32> {
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
pub(super) fn causal_mask(t: usize, pos: usize, device: &Device) -> candle_core::Result<Tensor> {
    let len = pos + t;
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| (0..len).map(move |j| if j > pos + i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (t, len), device)
}
