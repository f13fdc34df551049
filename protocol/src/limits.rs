//! Hard limits on everything a peer can send. A receiver checks them before
//! allocating, so a broken or hostile peer costs an error, never memory.

/// Largest frame body. 64 MiB: the activations of a 512-token prompt chunk
/// of a model with hidden size 8192 are 16 MiB in f32; four times that
/// leaves room for batches without letting one frame exhaust a node.
pub const FRAME_BYTES_MAX: usize = 64 << 20;

/// Largest activation payload. 48 MiB keeps a full frame's overhead (ids,
/// shapes) well inside [`FRAME_BYTES_MAX`].
pub const TENSOR_BYTES_MAX: usize = 48 << 20;

/// Most sequences in one activations or tokens message: the scheduler's
/// batch bound (continuous batching rarely goes past a few dozen).
pub const REQUESTS_PER_MESSAGE_MAX: usize = 256;

/// Most token positions one message carries for one sequence: the prompt
/// chunk size (512) with a wide margin for longer chunks.
pub const TOKENS_PER_MESSAGE_MAX: usize = 8192;

/// Most stages in a plan: more than any office has machines.
pub const STAGES_MAX: usize = 64;

/// Longest identifier or name string (node ids, cluster names, addresses).
pub const NAME_BYTES_MAX: usize = 256;

/// Most addresses a node advertises (interfaces × transports).
pub const ADDRS_MAX: usize = 32;

/// Most members a cluster tracks: an office, with room to spare; bounds
/// member lists and link reports.
pub const MEMBERS_MAX: usize = 64;

/// Longest free-text field (refusal and failure reasons).
pub const TEXT_BYTES_MAX: usize = 4096;

/// Longest context a request may ask for: 1 Mi tokens, beyond any model's
/// window, so the bound only stops nonsense.
pub const CONTEXT_TOKENS_MAX: usize = 1 << 20;

/// Largest chunk of a model file sent in one message.
pub const CHUNK_BYTES_MAX: usize = 16 << 20;

/// Most chunks a model file may have (4 MiB chunks: 4 TiB).
pub const CHUNKS_MAX: usize = 1 << 20;

/// Most layers a weight index describes.
pub const LAYERS_MAX: usize = 4096;

/// Most compute threads a node may claim.
pub const THREADS_MAX: u32 = 4096;

/// Most memory a node may claim for weights and caches: 1 PiB.
pub const MEMORY_BYTES_MAX: u64 = 1 << 50;

/// Fastest link a member may report: 1 TB/s.
pub const LINK_BYTES_PER_SECOND_MAX: f64 = 1e12;

/// Largest model file a weight index may describe: 2 TiB (a 405B model in
/// f16 is 0.8 TiB); a fetching node makes a file of this size.
pub const MODEL_BYTES_MAX: u64 = 2 << 40;

/// Largest sealed Hello in a `Join` (a Hello with every address at its
/// limit is ~10 KiB).
pub const SEALED_HELLO_BYTES_MAX: usize = 64 << 10;

/// Largest grammar a request may carry (JSON schema or Lark text): 256 KiB,
/// far past any tool list or response schema seen in practice.
pub const CONSTRAINT_BYTES_MAX: usize = 256 << 10;

/// Most alternatives per token in `logprobs` (OpenAI's `top_logprobs` limit).
pub const TOP_LOGPROBS_MAX: u8 = 20;

/// Most proposals one chunk may carry for verification.
pub const DRAFT_TOKENS_MAX: u32 = 16;
