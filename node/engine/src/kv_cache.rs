//! Per-sequence key/value cache of one stage.
//!
//! Each stage keeps the K and V of *its own* layers for every sequence it
//! serves; a sequence's cache lives as long as the request. Buffers grow by
//! doubling, so a step appends in O(new tokens) rather than copying the whole
//! history, and a short chat does not reserve memory for the full context.
//!
//! On the CPU the cache is f16 in plain vectors (llama.cpp's default type,
//! read by [`crate::attention`]); on a GPU it is f32 candle tensors written
//! in place with `slice_set`.

use candle_core::{DType, Device, Tensor};
use half::f16;

/// Smallest allocation, in positions: avoids regrowing on every early token.
const MIN_CAPACITY_TOKENS: usize = 64;

/// K and V of one layer: `[n_kv_heads, capacity, head_dim]` each.
#[derive(Debug, Default)]
struct LayerKv {
    k: Option<Tensor>,
    v: Option<Tensor>,
}

/// K and V of one layer on the host: `[n_kv_heads, capacity, head_dim]` f16.
#[derive(Debug, Default)]
struct HostKv {
    k: Vec<f16>,
    v: Vec<f16>,
}

/// The cache of one sequence for the layers of one stage.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<LayerKv>,
    host: Vec<HostKv>,
    len: usize,
    capacity: usize,
    max_len: usize,
}

impl KvCache {
    /// An empty cache for `n_layers` layers holding at most `max_len` positions.
    pub fn new(n_layers: usize, max_len: usize) -> Self {
        KvCache {
            layers: (0..n_layers).map(|_| LayerKv::default()).collect(),
            host: (0..n_layers).map(|_| HostKv::default()).collect(),
            len: 0,
            capacity: 0,
            max_len,
        }
    }

    /// Positions stored.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no position is stored.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The most positions this cache may hold (the context size).
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Forgets every position (keeps the buffers).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Drops positions `new_len..`, e.g. to reuse a shared prompt prefix.
    pub fn truncate(&mut self, new_len: usize) {
        self.len = self.len.min(new_len);
    }

    /// Bytes held by the buffers.
    pub fn bytes(&self) -> usize {
        let device: usize = self
            .layers
            .iter()
            .flat_map(|l| [&l.k, &l.v])
            .flatten()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum();
        let host: usize = self.host.iter().map(|l| (l.k.len() + l.v.len()) * 2).sum();
        device + host
    }

    /// The capacity needed for `t` more positions, grown by doubling.
    fn reserve(&self, t: usize) -> Option<usize> {
        let total = self.len + t;
        assert!(total <= self.max_len, "caller checks the context limit");
        (total > self.capacity).then(|| {
            (self.capacity * 2)
                .max(total)
                .max(MIN_CAPACITY_TOKENS)
                .min(self.max_len)
        })
    }

    /// Host path: stores `k`, `v` (`[n_kv_heads, t, head_dim]` f32, rounded
    /// to f16) for `layer` at position `self.len()`; returns the layer's
    /// buffers `[n_kv_heads, capacity, head_dim]` and the capacity. Call
    /// [`KvCache::advance`] once every layer of the step is appended.
    pub(crate) fn append_host(
        &mut self,
        layer: usize,
        k: &[f32],
        v: &[f32],
        n_kv: usize,
        hd: usize,
    ) -> (&[f16], &[f16], usize) {
        let t = k.len() / (n_kv * hd);
        assert!(k.len() == n_kv * t * hd && v.len() == k.len(), "kv shape");
        if let Some(cap) = self.reserve(t) {
            for l in &mut self.host {
                l.k = regrow(&l.k, n_kv, self.capacity, cap, hd, self.len);
                l.v = regrow(&l.v, n_kv, self.capacity, cap, hd, self.len);
            }
            self.capacity = cap;
        }
        let cap = self.capacity;
        let entry = &mut self.host[layer];
        if entry.k.is_empty() {
            entry.k = vec![f16::ZERO; n_kv * cap * hd];
            entry.v = vec![f16::ZERO; n_kv * cap * hd];
        }
        for h in 0..n_kv {
            let dst = (h * cap + self.len) * hd;
            let src = h * t * hd;
            for (d, s) in entry.k[dst..dst + t * hd]
                .iter_mut()
                .zip(&k[src..src + t * hd])
            {
                *d = f16::from_f32(*s);
            }
            for (d, s) in entry.v[dst..dst + t * hd]
                .iter_mut()
                .zip(&v[src..src + t * hd])
            {
                *d = f16::from_f32(*s);
            }
        }
        (&entry.k, &entry.v, cap)
    }

    /// Appends `k`, `v` (`[n_kv_heads, t, head_dim]`) for layer `layer` at
    /// position `self.len()` and returns views of the whole history
    /// `[n_kv_heads, len + t, head_dim]`. Call [`KvCache::advance`] once all
    /// layers of the step are appended.
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let (n_kv, t, hd) = k.dims3()?;
        let total = self.len + t;
        assert!(total <= self.max_len, "caller checks the context limit");
        if total > self.capacity {
            let new_cap = (self.capacity * 2)
                .max(total)
                .max(MIN_CAPACITY_TOKENS)
                .min(self.max_len);
            for l in &mut self.layers {
                l.k = grow(l.k.take(), new_cap, self.len, k.device())?;
                l.v = grow(l.v.take(), new_cap, self.len, k.device())?;
            }
            self.capacity = new_cap;
        }
        let entry = &mut self.layers[layer];
        let (kb, vb) = match (&entry.k, &entry.v) {
            (Some(kb), Some(vb)) => (kb, vb),
            _ => {
                entry.k = Some(Tensor::zeros(
                    (n_kv, self.capacity, hd),
                    DType::F32,
                    k.device(),
                )?);
                entry.v = Some(Tensor::zeros(
                    (n_kv, self.capacity, hd),
                    DType::F32,
                    k.device(),
                )?);
                (
                    entry.k.as_ref().expect("set"),
                    entry.v.as_ref().expect("set"),
                )
            }
        };
        kb.slice_set(&k.contiguous()?, 1, self.len)?;
        vb.slice_set(&v.contiguous()?, 1, self.len)?;
        Ok((kb.narrow(1, 0, total)?, vb.narrow(1, 0, total)?))
    }

    /// Marks `t` positions appended by the step that just ran on every layer.
    pub(crate) fn advance(&mut self, t: usize) {
        self.len += t;
        debug_assert!(self.len <= self.capacity.max(self.len));
    }
}

/// Copies the first `len` positions of each head into buffers of `cap`.
fn regrow(old: &[f16], n_kv: usize, old_cap: usize, cap: usize, hd: usize, len: usize) -> Vec<f16> {
    if old.is_empty() {
        return Vec::new();
    }
    let mut new = vec![f16::ZERO; n_kv * cap * hd];
    for h in 0..n_kv {
        new[h * cap * hd..][..len * hd].copy_from_slice(&old[h * old_cap * hd..][..len * hd]);
    }
    new
}

fn grow(
    old: Option<Tensor>,
    cap: usize,
    len: usize,
    device: &Device,
) -> candle_core::Result<Option<Tensor>> {
    let Some(old) = old else { return Ok(None) };
    let (n_kv, _, hd) = old.dims3()?;
    let new = Tensor::zeros((n_kv, cap, hd), DType::F32, device)?;
    if len > 0 {
        new.slice_set(&old.narrow(1, 0, len)?.contiguous()?, 1, 0)?;
    }
    Ok(Some(new))
}
