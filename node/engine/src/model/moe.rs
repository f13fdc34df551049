//! A routed mixture of experts (Qwen3-MoE), as llama.cpp's
//! `build_moe_ffn` computes it: a router picks `used` of `count` experts
//! per token by softmax probability, their weights renormalized to sum to
//! one; each chosen expert runs SwiGLU on the token, and the outputs are
//! summed, weighted, in the order the router ranked them.
//!
//! The experts of a layer stay with the layer's stage (the pipeline split
//! is by layers, as for dense models). Their weights are mapped, not read:
//! a token touches only the pages of the experts it runs.

use candle_core::{Device, Tensor};
use sharding::Experts;

use crate::ggml_ops;
use crate::linear::{LinearGroup, WeightBytes};

use super::Stage;

/// One expert's matrices.
struct Expert {
    gate_up: LinearGroup,
    down: LinearGroup,
}

/// The experts of one layer and their router.
pub(super) struct MoeFfn {
    router: LinearGroup,
    experts: Vec<Expert>,
    spec: Experts,
}

impl MoeFfn {
    /// The layer's router `[dim, count]` and stacked expert tensors
    /// (`gate`/`up` `[dim, ffn, count]`, `down` `[ffn, dim, count]`).
    pub(super) fn new(
        spec: Experts,
        router: WeightBytes,
        gate: WeightBytes,
        up: WeightBytes,
        down: WeightBytes,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let (eff, dim) = (spec.ffn_dim as u64, down.info().dims[1]);
        let experts = (0..spec.count as u64)
            .map(|e| {
                Ok(Expert {
                    gate_up: LinearGroup::new(
                        vec![gate.rows(e * eff, eff), up.rows(e * eff, eff)],
                        device,
                    )?,
                    down: LinearGroup::new(vec![down.rows(e * dim, dim)], device)?,
                })
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(MoeFfn {
            router: LinearGroup::new(vec![router], device)?,
            experts,
            spec,
        })
    }

    /// `h` is `[t, dim]` (the normed input); returns `[t, dim]`.
    pub(super) fn forward(&self, stage: &Stage, h: &Tensor) -> candle_core::Result<Tensor> {
        let (t, dim) = h.dims2()?;
        let (count, used) = (self.spec.count, self.spec.used);
        let logits = self.router.forward_one(h)?.to_vec2::<f32>()?;
        // Per token: the chosen experts, best first, and their weights.
        let routes: Vec<Vec<(usize, f32)>> = logits
            .iter()
            .map(|row| route(row, used, self.spec.normalize))
            .collect();
        debug_assert!(routes.iter().all(|r| r.iter().all(|&(e, _)| e < count)));
        // Each expert runs once over all the tokens that chose it.
        let mut outputs: Vec<Vec<Option<Vec<f32>>>> = vec![vec![None; used]; t];
        let hv = h.to_vec2::<f32>()?;
        for (e, expert) in self.experts.iter().enumerate() {
            let mine: Vec<(usize, usize)> = routes
                .iter()
                .enumerate()
                .flat_map(|(tok, r)| r.iter().position(|&(x, _)| x == e).map(|slot| (tok, slot)))
                .collect();
            if mine.is_empty() {
                continue;
            }
            let rows: Vec<f32> = mine.iter().flat_map(|&(tok, _)| hv[tok].clone()).collect();
            let x = Tensor::from_vec(rows, (mine.len(), dim), h.device())?;
            let gu = expert.gate_up.forward(&x)?;
            let y = expert.down.forward_one(&stage.activate(&gu[0], &gu[1])?)?;
            for (&(tok, slot), out) in mine.iter().zip(y.to_vec2::<f32>()?) {
                outputs[tok][slot] = Some(out);
            }
        }
        // Weighted, then summed in rank order (ggml: experts * weights,
        // then e0 + e1 + ...).
        let mut out = Vec::with_capacity(t * dim);
        for (tok, slots) in outputs.into_iter().enumerate() {
            let mut acc: Option<Vec<f32>> = None;
            for (slot, y) in slots.into_iter().enumerate() {
                let w = routes[tok][slot].1;
                let mut y = y.expect("every chosen expert ran");
                ggml_ops::scale(&mut y, w);
                acc = Some(match acc {
                    None => y,
                    Some(mut a) => {
                        a.iter_mut().zip(&y).for_each(|(a, b)| *a += b);
                        a
                    }
                });
            }
            out.extend(acc.expect("at least one expert per token"));
        }
        Tensor::from_vec(out, (t, dim), h.device())
    }
}

/// Softmax over the router logits, the `used` most probable experts (ties
/// to the lower index), their probabilities renormalized when asked
/// (the sum clamped below as ggml does).
fn route(logits: &[f32], used: usize, normalize: bool) -> Vec<(usize, f32)> {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f64;
    let mut probs: Vec<f32> = logits
        .iter()
        .map(|&l| {
            let e = (l - max).exp();
            sum += e as f64;
            e
        })
        .collect();
    let inv = (1.0 / sum) as f32;
    probs.iter_mut().for_each(|p| *p *= inv);
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
    let mut chosen: Vec<(usize, f32)> = order[..used].iter().map(|&e| (e, probs[e])).collect();
    if normalize {
        let total = chosen.iter().map(|&(_, p)| p as f64).sum::<f64>() as f32;
        let total = total.max(6.103_515_6e-5);
        chosen.iter_mut().for_each(|(_, p)| *p /= total);
    }
    chosen
}

#[cfg(test)]
mod tests {
    use super::route;

    #[test]
    fn routes_to_the_most_probable_experts_with_weights_summing_to_one() {
        let r = route(&[0.1, 2.0, -1.0, 1.5, 2.0], 3, true);
        assert_eq!(r.iter().map(|x| x.0).collect::<Vec<_>>(), [1, 4, 3]);
        let total: f32 = r.iter().map(|x| x.1).sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert!(r[0].1 == r[1].1 && r[1].1 > r[2].1);
    }
}
