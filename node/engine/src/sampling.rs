//! Token sampling: a pure function of logits, history and a seeded RNG.
//!
//! The chain follows llama.cpp's default order — repetition, presence and
//! frequency penalties, top-k,
//! top-p, min-p, temperature, then a draw — so the same settings mean the same
//! thing to someone coming from llama.cpp or Ollama. Temperature 0 is greedy.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// Sampling settings for one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// Softmax temperature; `<= 0` means greedy (argmax).
    pub temperature: f32,
    /// Keep the k most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1.0 = all).
    pub top_p: f32,
    /// Drop tokens below `min_p` times the most likely one's probability (0 = off).
    pub min_p: f32,
    /// Divide positive (multiply negative) logits of recent tokens by this (1.0 = off).
    pub repeat_penalty: f32,
    /// How many recent tokens the penalties look at.
    pub repeat_last_n: usize,
    /// Subtracted from the logit of every recent token once (OpenAI's
    /// `presence_penalty`, -2..=2; 0 = off).
    pub presence_penalty: f32,
    /// Subtracted from a recent token's logit once per time it occurs
    /// (OpenAI's `frequency_penalty`, -2..=2; 0 = off).
    pub frequency_penalty: f32,
    /// RNG seed: the same seed and settings give the same tokens.
    pub seed: u64,
}

impl Default for SamplingParams {
    /// llama.cpp's defaults.
    fn default() -> Self {
        SamplingParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// Checks ranges; returns a message naming the bad setting.
    pub fn validate(&self) -> Result<(), String> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return Err(format!("{name} must be in [-2, 2], got {v}"));
            }
        }
        if !self.repeat_penalty.is_finite() || self.repeat_penalty <= 0.0 {
            return Err(format!(
                "repeat_penalty must be > 0, got {}",
                self.repeat_penalty
            ));
        }
        Ok(())
    }
}

/// The settings as they travel to the last stage of a pipeline.
impl From<&SamplingParams> for protocol::Sampling {
    fn from(s: &SamplingParams) -> Self {
        protocol::Sampling {
            temperature: s.temperature,
            top_k: s.top_k as u32,
            top_p: s.top_p,
            min_p: s.min_p,
            repeat_penalty: s.repeat_penalty,
            repeat_last_n: s.repeat_last_n as u32,
            presence_penalty: s.presence_penalty,
            frequency_penalty: s.frequency_penalty,
            seed: s.seed,
        }
    }
}

/// The settings as the last stage of a pipeline receives them.
impl From<&protocol::Sampling> for SamplingParams {
    fn from(s: &protocol::Sampling) -> Self {
        SamplingParams {
            temperature: s.temperature,
            top_k: s.top_k as usize,
            top_p: s.top_p,
            min_p: s.min_p,
            repeat_penalty: s.repeat_penalty,
            repeat_last_n: s.repeat_last_n as usize,
            presence_penalty: s.presence_penalty,
            frequency_penalty: s.frequency_penalty,
            seed: s.seed,
        }
    }
}

/// Draws tokens for one sequence.
///
/// Each draw's randomness is a function of the seed and the position
/// drawn for (the history's length), not of the draws before it: a
/// sequence replayed elsewhere from its tokens so far (a stage lost, the
/// request continued on a new plan) draws exactly what it would have.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
}

/// The random number for the token at `position` of a sequence seeded
/// with `seed` (splitmix64 over both, then the RNG's own seeding).
fn draw(seed: u64, position: usize) -> f64 {
    let mut z = seed ^ (position as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    StdRng::seed_from_u64(z ^ (z >> 31)).random::<f64>()
}

impl Sampler {
    /// A sampler seeded with `params.seed`.
    pub fn new(params: SamplingParams) -> Self {
        Sampler { params }
    }

    /// The settings.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from `logits` given the tokens so far.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let logits = self.adjusted(logits.to_vec(), history);
        self.pick(&logits, history.len())
    }

    /// The logits after the repetition, presence and frequency penalties
    /// over `history`: the distribution [`Sampler::pick`] draws from, and
    /// the one log-probabilities are reported for.
    pub fn adjusted(&self, mut logits: Vec<f32>, history: &[u32]) -> Vec<f32> {
        let p = &self.params;
        if p.repeat_penalty != 1.0 {
            let start = history.len().saturating_sub(p.repeat_last_n);
            let mut seen = std::collections::HashSet::new();
            for &tok in &history[start..] {
                if let Some(l) = logits.get_mut(tok as usize) {
                    if seen.insert(tok) {
                        *l = if *l > 0.0 {
                            *l / p.repeat_penalty
                        } else {
                            *l * p.repeat_penalty
                        };
                    }
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            // As llama.cpp: over the same window as the repetition penalty.
            let start = history.len().saturating_sub(p.repeat_last_n);
            let mut counts: std::collections::HashMap<u32, u32> = Default::default();
            for &tok in &history[start..] {
                *counts.entry(tok).or_default() += 1;
            }
            for (tok, n) in counts {
                if let Some(l) = logits.get_mut(tok as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * n as f32;
                }
            }
        }
        logits
    }

    /// Draws the token for position `position` from penalised logits
    /// (see [`Sampler::adjusted`]).
    pub fn pick(&self, logits: &[f32], position: usize) -> u32 {
        assert!(!logits.is_empty(), "empty logits");
        let p = &self.params;
        if p.temperature <= 0.0 {
            return argmax(logits);
        }
        // Candidates sorted by logit, best first (ties by id, for determinism).
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| !l.is_nan())
            .map(|(i, &l)| (i as u32, l))
            .collect();
        if cand.is_empty() {
            // Every logit NaN: nothing to draw from (the engine refuses
            // such logits; this keeps the sampler total).
            return argmax(logits);
        }
        let by_logit = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && p.top_k < cand.len() {
            cand.select_nth_unstable_by(p.top_k - 1, by_logit);
            cand.truncate(p.top_k);
        }
        cand.sort_unstable_by(by_logit);
        let probs = softmax(&cand, 1.0);
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let keep = probs
                .iter()
                .position(|&pr| {
                    acc += pr;
                    acc >= p.top_p as f64
                })
                .map_or(cand.len(), |i| i + 1);
            cand.truncate(keep.max(1));
        }
        if p.min_p > 0.0 {
            let max = cand[0].1;
            let floor = max + p.min_p.ln();
            let keep = cand.iter().take_while(|c| c.1 >= floor).count();
            cand.truncate(keep.max(1));
        }
        let probs = softmax(&cand, p.temperature);
        let r = draw(p.seed, position);
        let mut acc = 0.0;
        for (c, pr) in cand.iter().zip(&probs) {
            acc += *pr;
            if r < acc {
                return c.0;
            }
        }
        cand.last().expect("at least one candidate").0
    }
}

/// The log-probability of `token` under `logits` (a log-softmax at
/// temperature 1), and the `top` most likely tokens with theirs, best
/// first (ties by id). Tokens at −∞ (masked) are never among the top.
pub fn logprobs(logits: &[f32], token: u32, top: usize) -> (f32, Vec<(u32, f32)>) {
    let max = logits
        .iter()
        .copied()
        .filter(|l| l.is_finite())
        .fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits
        .iter()
        .filter(|l| l.is_finite())
        .map(|&l| f64::from(l - max).exp())
        .sum();
    let norm = max as f64 + sum.ln();
    let lp = |l: f32| (f64::from(l) - norm).max(-1e30) as f32;
    let chosen = logits.get(token as usize).map_or(-1e30, |&l| lp(l));
    let mut best: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .filter(|(_, l)| l.is_finite())
        .map(|(i, &l)| (i as u32, l))
        .collect();
    let by_logit = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if top > 0 && top < best.len() {
        best.select_nth_unstable_by(top - 1, by_logit);
    }
    best.truncate(top);
    best.sort_unstable_by(by_logit);
    (chosen, best.into_iter().map(|(i, l)| (i, lp(l))).collect())
}

/// Index of the largest logit (the first on ties, like llama.cpp).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

fn softmax(cand: &[(u32, f32)], temperature: f32) -> Vec<f64> {
    let max = cand.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max) as f64;
    let t = temperature as f64;
    let e: Vec<f64> = cand
        .iter()
        .map(|c| ((c.1 as f64 - max) / t).exp())
        .collect();
    let sum: f64 = e.iter().sum();
    e.into_iter().map(|v| v / sum).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn nan_logits_do_not_panic_the_sampler() {
        for temperature in [0.0, 0.8] {
            let mut s = Sampler::new(SamplingParams {
                temperature,
                ..SamplingParams::default()
            });
            let t = s.sample(&[f32::NAN; 16], &[1, 2, 3]);
            assert!(t < 16);
        }
    }

    use super::*;

    fn logits() -> Vec<f32> {
        (0..100).map(|i| ((i * 37) % 100) as f32 / 10.0).collect()
    }

    #[test]
    fn greedy_is_argmax() {
        let l = logits();
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample(&l, &[]), argmax(&l));
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1);
    }

    #[test]
    fn same_seed_same_tokens() {
        let l = logits();
        let params = SamplingParams {
            seed: 42,
            top_k: 0,
            min_p: 0.0,
            temperature: 1.5,
            ..Default::default()
        };
        let run = |p: &SamplingParams| {
            let mut s = Sampler::new(p.clone());
            let mut history = vec![1u32, 2];
            for _ in 0..50 {
                let t = s.sample(&l, &history);
                history.push(t);
            }
            history
        };
        assert_eq!(run(&params), run(&params));
        // A fresh sampler given the history so far (a replay on another
        // stage) draws what the first would have.
        let all = run(&params);
        let mut fresh = Sampler::new(params.clone());
        assert_eq!(fresh.sample(&l, &all[..30]), all[30]);
        assert_ne!(
            run(&params),
            run(&SamplingParams {
                seed: 43,
                ..params.clone()
            })
        );
    }

    #[test]
    fn presence_and_frequency_penalties_push_recent_tokens_down() {
        // Token 2 leads by 1.0; it occurred twice recently.
        let l = vec![0.0f32, 0.5, 1.5, 0.2];
        let history = [2u32, 2, 1];
        let pick = |presence: f32, frequency: f32| {
            let mut s = Sampler::new(SamplingParams {
                presence_penalty: presence,
                frequency_penalty: frequency,
                ..SamplingParams::greedy()
            });
            s.sample(&l, &history)
        };
        assert_eq!(pick(0.0, 0.0), 2);
        // 1.5 - 0.8 = 0.7 still beats 0.5 - 0.8 and 0.2.
        assert_eq!(pick(0.8, 0.0), 2);
        // 1.5 - 2 * 0.7 = 0.1 < 0.2 (token 3, never seen).
        assert_eq!(pick(0.0, 0.7), 3);
        // Negative values favour repeats.
        assert_eq!(pick(-2.0, 0.0), 2);
        assert!(SamplingParams {
            presence_penalty: 2.5,
            ..SamplingParams::greedy()
        }
        .validate()
        .is_err());
    }

    #[test]
    fn top_k_one_is_greedy() {
        let l = logits();
        let mut s = Sampler::new(SamplingParams {
            top_k: 1,
            temperature: 5.0,
            ..Default::default()
        });
        for _ in 0..20 {
            assert_eq!(s.sample(&l, &[]), argmax(&l));
        }
    }

    #[test]
    fn filters_bound_the_candidates() {
        let mut l = vec![0.0f32; 10];
        l[3] = 10.0;
        l[7] = 9.9;
        // min_p 0.5 keeps only tokens with prob >= half the best: 3 and 7.
        let mut s = Sampler::new(SamplingParams {
            min_p: 0.5,
            top_k: 0,
            temperature: 1.0,
            ..Default::default()
        });
        for _ in 0..50 {
            assert!([3, 7].contains(&s.sample(&l, &[])));
        }
        let mut s = Sampler::new(SamplingParams {
            top_p: 0.5,
            top_k: 0,
            min_p: 0.0,
            temperature: 1.0,
            ..Default::default()
        });
        for _ in 0..50 {
            assert_eq!(s.sample(&l, &[]), 3);
        }
    }

    #[test]
    fn repetition_penalty_steers_away() {
        let l = vec![2.0f32, 1.9, 0.0];
        let mut s = Sampler::new(SamplingParams {
            repeat_penalty: 1.5,
            ..SamplingParams::greedy()
        });
        assert_eq!(s.sample(&l, &[0]), 1);
        assert_eq!(s.sample(&l, &[]), 0);
    }

    #[test]
    fn validate_names_the_setting() {
        let bad = SamplingParams {
            top_p: 0.0,
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().contains("top_p"));
        assert!(SamplingParams::default().validate().is_ok());
    }
}
