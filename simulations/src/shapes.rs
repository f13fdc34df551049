//! Named model shapes and quant sizes, so a scenario can ask about
//! `llama-3-70b` at `q4_k_m` without the 40 GB file. The numbers are the
//! models' published hyperparameters (config.json); sizes follow from them
//! the way a GGUF's do (norms in f32 are left out: under 0.01 %).

use sharding::ModelSpec;

/// A llama-family transformer's hyperparameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shape {
    /// Its name in scenario files.
    pub name: &'static str,
    /// Transformer blocks.
    pub layers: usize,
    /// Hidden size.
    pub dim: usize,
    /// Feed-forward size.
    pub ffn: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Size of one head.
    pub head_dim: usize,
    /// Vocabulary.
    pub vocab: usize,
    /// Whether the output head is the embedding matrix.
    pub tied: bool,
}

/// The shapes scenario files may name.
pub const SHAPES: &[Shape] = &[
    Shape {
        name: "smollm2-135m",
        layers: 30,
        dim: 576,
        ffn: 1536,
        heads: 9,
        kv_heads: 3,
        head_dim: 64,
        vocab: 49152,
        tied: true,
    },
    Shape {
        name: "llama-3.2-1b",
        layers: 16,
        dim: 2048,
        ffn: 8192,
        heads: 32,
        kv_heads: 8,
        head_dim: 64,
        vocab: 128256,
        tied: true,
    },
    Shape {
        name: "llama-3-8b",
        layers: 32,
        dim: 4096,
        ffn: 14336,
        heads: 32,
        kv_heads: 8,
        head_dim: 128,
        vocab: 128256,
        tied: false,
    },
    Shape {
        name: "qwen2.5-32b",
        layers: 64,
        dim: 5120,
        ffn: 27648,
        heads: 40,
        kv_heads: 8,
        head_dim: 128,
        vocab: 152064,
        tied: false,
    },
    Shape {
        name: "llama-3-70b",
        layers: 80,
        dim: 8192,
        ffn: 28672,
        heads: 64,
        kv_heads: 8,
        head_dim: 128,
        vocab: 128256,
        tied: false,
    },
    Shape {
        name: "llama-3.1-405b",
        layers: 126,
        dim: 16384,
        ffn: 53248,
        heads: 128,
        kv_heads: 8,
        head_dim: 128,
        vocab: 128256,
        tied: false,
    },
];

/// Bits per weight of the quant types scenario files may name (block
/// scales included: Q4_0 is 18 bytes per 32 weights = 4.5 bits).
pub const QUANTS: &[(&str, f64)] = &[
    ("q4_0", 4.5),
    ("q4_1", 5.0),
    ("q4_k_m", 4.85),
    ("q5_k_m", 5.69),
    ("q6_k", 6.56),
    ("q8_0", 8.5),
    ("f16", 16.0),
];

/// The shape called `name`.
pub fn shape(name: &str) -> Option<&'static Shape> {
    SHAPES.iter().find(|s| s.name.eq_ignore_ascii_case(name))
}

/// Bits per weight of quant type `name`.
pub fn bits_per_weight(name: &str) -> Option<f64> {
    QUANTS
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|&(_, b)| b)
}

impl Shape {
    /// Weights of one block.
    pub fn layer_params(&self) -> u64 {
        let (d, q, kv) = (
            self.dim,
            self.heads * self.head_dim,
            self.kv_heads * self.head_dim,
        );
        (d * q + 2 * d * kv + q * d + 3 * d * self.ffn) as u64
    }

    /// Weights in all.
    pub fn params(&self) -> u64 {
        let table = (self.vocab * self.dim) as u64;
        self.layer_params() * self.layers as u64 + table * if self.tied { 1 } else { 2 }
    }

    /// The planner's view at `bits` per weight, caching `context` tokens
    /// with `kv_bytes_per_element` (2: f16, as on CPUs).
    pub fn spec(&self, bits: f64, context: u64, kv_bytes_per_element: u64) -> ModelSpec {
        let bytes = |params: u64| (params as f64 * bits / 8.0) as u64;
        let table = bytes((self.vocab * self.dim) as u64);
        let norm = self.dim as u64 * 4;
        ModelSpec {
            layer_bytes: vec![bytes(self.layer_params()); self.layers],
            first_bytes: table,
            last_bytes: table + norm,
            last_compute_bytes: table + norm,
            kv_bytes_per_token_layer: (2 * self.kv_heads * self.head_dim) as u64
                * kv_bytes_per_element,
            context_tokens: context,
            activation_bytes: self.dim as u64 * 4,
        }
    }
}
