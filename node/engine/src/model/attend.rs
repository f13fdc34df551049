//! Attention and the small ops around it: on the host with ggml's
//! arithmetic (f16 cache), or on a device through candle.

use super::*;

impl Stage {
    /// RoPE, cache append and attention on the CPU for every sequence of
    /// the batch; `q`, `k`, `v` are `[Σ rows, heads * head_dim]`. Sequences
    /// run in parallel: each reads only its own cache.
    pub(super) fn attend_host(
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

    /// `silu(gate) * up`; ggml's arithmetic on the CPU ([`ggml_ops`]).
    pub(super) fn swiglu(&self, gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
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
    pub(super) fn attend_on_device(
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
