//! The tokenizer of a GGUF model, built from its `tokenizer.ggml.*` metadata.
//!
//! Why its own implementation: token ids must equal llama.cpp's for the same text, so this
//! module follows `llama_vocab` (src/llama-vocab.cpp) rather than Hugging Face where they
//! differ: special-token splitting (`tokenizer_st_partition`: longest text first), the
//! per-`pre` regexes and flags, SentencePiece's bigram merge, the text-based detection of
//! end-of-generation tokens, and `token_to_piece` / `detokenize` for the way back. Supported
//! vocab types: `gpt2` (byte-level BPE, [`bpe`]) and `llama` (SentencePiece, [`spm`]).

mod bpe;
mod pretokenize;
mod spm;
mod vocab;

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};

/// Largest text [`Tokenizer::encode`] accepts, in bytes: room for a whole
/// perplexity corpus (wikitext-2's test set is 1.3 MB) with margin; prompts
/// are bounded well below this by their callers.
pub const MAX_INPUT_BYTES: usize = 64 << 20;
/// Largest vocabulary accepted (a bound against corrupt metadata).
pub const MAX_VOCAB_TOKENS: usize = 1 << 22;

/// Why a tokenizer could not be built or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenizerError {
    /// `tokenizer.ggml.model` names a vocab type this crate does not implement.
    #[error("unsupported tokenizer model '{0}' (supported: gpt2, llama)")]
    UnsupportedModel(String),
    /// `tokenizer.ggml.pre` names a pre-tokenizer this crate cannot reproduce.
    #[error("unsupported pre-tokenizer '{0}' (needs a tokenizer this crate does not implement)")]
    UnsupportedPre(String),
    /// A required metadata key is absent.
    #[error("missing GGUF metadata key '{0}'")]
    MissingKey(&'static str),
    /// A metadata key has the wrong type or an unusable value.
    #[error("invalid GGUF metadata key '{key}': {reason}")]
    InvalidKey {
        /// The key.
        key: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The vocabulary is inconsistent.
    #[error("invalid vocabulary: {0}")]
    InvalidVocab(String),
    /// The same token text appears twice.
    #[error("duplicate token in vocabulary: '{text}' has ids {first} and {second}")]
    DuplicateToken {
        /// The token text.
        text: String,
        /// Its first id.
        first: u32,
        /// Its second id.
        second: u32,
    },
    /// The text to encode is larger than [`MAX_INPUT_BYTES`].
    #[error("input text of {len} bytes is larger than the {max} bytes the tokenizer accepts")]
    InputTooLarge {
        /// The text's length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The BPE backend (`tokenizers` crate) failed.
    #[error("tokenizer backend error: {0}")]
    Backend(String),
}

/// Token attribute bits, as llama.cpp's `llama_token_attr`.
pub(crate) mod attr {
    /// Unknown token (`<unk>`).
    pub(crate) const UNKNOWN: u32 = 1 << 0;
    /// Unused token.
    pub(crate) const UNUSED: u32 = 1 << 1;
    /// Ordinary text token.
    pub(crate) const NORMAL: u32 = 1 << 2;
    /// Control token: rendered as nothing, matched in text only with `parse_special`.
    pub(crate) const CONTROL: u32 = 1 << 3;
    /// User-defined token: always matched in text, rendered as its text.
    pub(crate) const USER_DEFINED: u32 = 1 << 4;
    /// Byte token (`<0xXX>`).
    pub(crate) const BYTE: u32 = 1 << 5;
    /// Strip whitespace on the left of the token when splitting it out.
    pub(crate) const LSTRIP: u32 = 1 << 7;
    /// Strip whitespace on the right of the token when splitting it out.
    pub(crate) const RSTRIP: u32 = 1 << 8;
}

/// The vocabulary: token texts, scores, attributes and the reverse map.
pub(crate) struct Vocab {
    pub(crate) texts: Vec<String>,
    pub(crate) scores: Vec<f32>,
    pub(crate) attrs: Vec<u32>,
    pub(crate) ids: HashMap<String, u32>,
}

/// Special-token ids named by the GGUF (`tokenizer.ggml.*_token_id`), not yet validated.
#[derive(Debug, Clone, Default)]
pub(crate) struct SpecialIds {
    pub(crate) bos: Option<u64>,
    pub(crate) eos: Option<u64>,
    pub(crate) eot: Option<u64>,
    pub(crate) eom: Option<u64>,
    pub(crate) unk: Option<u64>,
    pub(crate) fim_pre: Option<u64>,
    pub(crate) fim_suf: Option<u64>,
    pub(crate) fim_mid: Option<u64>,
    pub(crate) fim_pad: Option<u64>,
    pub(crate) fim_rep: Option<u64>,
    pub(crate) fim_sep: Option<u64>,
}

/// What a [`Tokenizer`] is built from: the tokenizer metadata of a GGUF.
#[derive(Debug, Clone, Default)]
pub(crate) struct TokenizerParts {
    pub(crate) model: String,
    pub(crate) pre: Option<String>,
    pub(crate) tokens: Vec<String>,
    pub(crate) scores: Option<Vec<f32>>,
    pub(crate) token_types: Option<Vec<i32>>,
    pub(crate) merges: Option<Vec<String>>,
    pub(crate) ids: SpecialIds,
    pub(crate) add_bos: Option<bool>,
    pub(crate) add_eos: Option<bool>,
    pub(crate) add_space_prefix: Option<bool>,
    /// `general.name`, for llama.cpp's per-model token attributes (phi-3).
    pub(crate) model_name: Option<String>,
    /// `general.architecture`, likewise.
    pub(crate) arch: Option<String>,
}

/// The algorithm of the vocab.
enum Algorithm {
    Bpe(Box<bpe::BpeEngine>),
    Spm,
}

/// A piece of the input after special-token splitting: a byte range of text, or a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fragment {
    Text(usize, usize),
    Token(u32),
}

/// A GGUF model's tokenizer: text ↔ token ids, as llama.cpp does it. `Send + Sync`.
pub struct Tokenizer {
    vocab: Vocab,
    algorithm: Algorithm,
    bos: Option<u32>,
    eos: Option<u32>,
    eot: Option<u32>,
    unk: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    add_space_prefix: bool,
    clean_spaces: bool,
    eog: BTreeSet<u32>,
    /// Control, user-defined and unknown tokens, longest text first.
    special_cache: Vec<u32>,
    /// `token_to_piece(id, special = false)` of every token.
    pieces: Vec<Box<[u8]>>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("type", &if self.is_spm() { "llama" } else { "gpt2" })
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("add_bos", &self.add_bos)
            .field("eog", &self.eog)
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Builds the tokenizer from a GGUF's `tokenizer.ggml.*` metadata.
    pub fn from_gguf(gguf: &sharding::GgufFile) -> Result<Self, TokenizerError> {
        Self::from_parts(vocab::parts_from_gguf(gguf)?)
    }

    /// Builds the tokenizer from already-read metadata (see [`TokenizerParts`]).
    pub(crate) fn from_parts(parts: TokenizerParts) -> Result<Self, TokenizerError> {
        vocab::build(parts)
    }

    fn is_spm(&self) -> bool {
        matches!(self.algorithm, Algorithm::Spm)
    }

    /// Tokenizes like llama.cpp's `common_tokenize(ctx, text, add_special, parse_special)`.
    ///
    /// `add_special` adds BOS/EOS only where the vocab asks for them (`add_bos_token`,
    /// `add_eos_token`; llama.cpp's defaults: `true`/`false` for llama vocabs, `false`/`false`
    /// for gpt2 vocabs except the llama3 family, tekken and chameleon). `parse_special` lets the
    /// texts of control tokens (e.g. `<|im_start|>`) in `text` map to their ids; user-defined
    /// tokens are split out either way, as in llama.cpp.
    pub fn encode(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<u32>, TokenizerError> {
        let literal: &[std::ops::Range<usize>] = &[];
        self.encode_parts(text, add_special, parse_special.then_some(literal))
    }

    /// [`Tokenizer::encode`] with special tokens parsed everywhere except in
    /// the byte ranges `literal` (the messages people wrote, inside a
    /// rendered chat template): there a control token's text stays text,
    /// so a user cannot forge a turn of the template. Elsewhere the tokens
    /// are exactly `encode(text, add_special, true)`'s.
    pub fn encode_with_literal(
        &self,
        text: &str,
        add_special: bool,
        literal: &[std::ops::Range<usize>],
    ) -> Result<Vec<u32>, TokenizerError> {
        self.encode_parts(text, add_special, Some(literal))
    }

    fn encode_parts(
        &self,
        text: &str,
        add_special: bool,
        special_outside: Option<&[std::ops::Range<usize>]>,
    ) -> Result<Vec<u32>, TokenizerError> {
        if text.len() > MAX_INPUT_BYTES {
            return Err(TokenizerError::InputTooLarge {
                len: text.len(),
                max: MAX_INPUT_BYTES,
            });
        }
        let fragments = self.partition(text, special_outside);
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_special && self.add_bos {
            out.extend(self.bos);
        }
        let mut prev_special = true; // SentencePiece: prefix a space to the first text
        for fragment in fragments {
            match (fragment, &self.algorithm) {
                (Fragment::Token(id), _) => {
                    out.push(id);
                    prev_special = true;
                }
                (Fragment::Text(start, end), Algorithm::Bpe(engine)) => {
                    engine.tokenize(&text[start..end], &mut out)?;
                }
                (Fragment::Text(start, end), Algorithm::Spm) => {
                    let mut raw = String::with_capacity(end - start + 1);
                    if self.add_space_prefix && prev_special {
                        raw.push(' ');
                    }
                    raw.push_str(&text[start..end]);
                    let escaped = raw.replace(' ', "\u{2581}");
                    spm::tokenize(&self.vocab, &escaped, self.unk, &mut out);
                    prev_special = false;
                }
            }
        }
        if add_special && self.add_eos {
            out.extend(self.eos);
        }
        Ok(out)
    }

    /// Splits special-token texts out of `text` (llama.cpp `tokenizer_st_partition`): each
    /// special token, longest first, is searched in every remaining text fragment.
    /// Control tokens only with `special_outside`, and not where they
    /// overlap one of its ranges.
    fn partition(
        &self,
        text: &str,
        special_outside: Option<&[std::ops::Range<usize>]>,
    ) -> Vec<Fragment> {
        let parse_special = special_outside.is_some();
        let literal = special_outside.unwrap_or(&[]);
        if text.is_empty() {
            return Vec::new();
        }
        let bytes = text.as_bytes();
        let mut fragments = vec![Fragment::Text(0, text.len())];
        for &id in &self.special_cache {
            let attrs = self.vocab.attrs[id as usize];
            if !parse_special && attrs & (attr::CONTROL | attr::UNKNOWN) != 0 {
                continue;
            }
            let needle = self.vocab.texts[id as usize].as_str();
            if !fragments.iter().any(|f| match *f {
                Fragment::Text(s, e) => text[s..e].contains(needle),
                Fragment::Token(_) => false,
            }) {
                continue;
            }
            let control = attrs & (attr::CONTROL | attr::UNKNOWN) != 0;
            let mut next = Vec::with_capacity(fragments.len() + 2);
            for fragment in fragments {
                let Fragment::Text(mut start, end) = fragment else {
                    next.push(fragment);
                    continue;
                };
                // Where to look next: past occurrences left as text.
                let mut from = start;
                loop {
                    let Some(rel) = text[from..end].find(needle) else {
                        next.push(Fragment::Text(start, end));
                        break;
                    };
                    let at = from + rel;
                    let span = at..at + needle.len();
                    if control
                        && literal
                            .iter()
                            .any(|l| l.start < span.end && span.start < l.end)
                    {
                        from = at + text[at..].chars().next().map_or(1, char::len_utf8);
                        continue;
                    }
                    let mut left_end = at;
                    if attrs & attr::LSTRIP != 0 {
                        while left_end > start && c_isspace(bytes[left_end - 1]) {
                            left_end -= 1;
                        }
                    }
                    if left_end > start {
                        next.push(Fragment::Text(start, left_end));
                    }
                    next.push(Fragment::Token(id));
                    let mut right = at + needle.len();
                    if attrs & attr::RSTRIP != 0 {
                        while right < end && c_isspace(bytes[right]) {
                            right += 1;
                        }
                    }
                    if right >= end {
                        break;
                    }
                    start = right;
                    from = right;
                }
            }
            fragments = next;
        }
        fragments
    }

    /// Number of tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.vocab.texts.len()
    }

    /// The beginning-of-sequence token, if the vocab has one.
    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    /// The end-of-sequence token, if the vocab has one.
    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// The end-of-turn token (`tokenizer.ggml.eot_token_id` or detected by its text).
    pub fn eot(&self) -> Option<u32> {
        self.eot
    }

    /// Whether `encode(.., add_special = true, ..)` prepends BOS.
    pub fn adds_bos(&self) -> bool {
        self.add_bos
    }

    /// Whether `encode(.., add_special = true, ..)` appends EOS.
    pub fn adds_eos(&self) -> bool {
        self.add_eos
    }

    /// True for tokens that end generation (llama.cpp's `special_eog_ids`: eos, eot, eom,
    /// FIM pad/repo/sep and control tokens such as `<|im_end|>`, `<|endoftext|>`, `</s>`).
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.contains(&id)
    }

    /// All end-of-generation tokens, ascending.
    pub fn eog_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.eog.iter().copied()
    }

    /// The bytes a token contributes to the output text (llama.cpp `token_to_piece` with
    /// `special = false`): control and unknown tokens give nothing, byte tokens their byte,
    /// byte-level tokens their decoded bytes. Out-of-range ids give nothing.
    pub fn token_bytes(&self, id: u32) -> Cow<'_, [u8]> {
        Cow::Borrowed(self.pieces.get(id as usize).map_or(&[][..], |p| &p[..]))
    }

    /// Like [`Self::token_bytes`], but control and unknown tokens render as their text
    /// (llama.cpp `special = true`), for debugging and prompt display.
    pub fn token_bytes_special(&self, id: u32) -> Cow<'_, [u8]> {
        let index = id as usize;
        match self.vocab.attrs.get(index) {
            Some(a) if a & (attr::CONTROL | attr::UNKNOWN) != 0 => {
                Cow::Borrowed(self.vocab.texts[index].as_bytes())
            }
            _ => self.token_bytes(id),
        }
    }

    /// Whether decoding cleans up spaces (llama.cpp's `clean_spaces`):
    /// then a decode need not give the input text back.
    pub fn cleans_spaces(&self) -> bool {
        self.clean_spaces
    }

    /// Detokenizes a sequence (llama.cpp `detokenize` with `remove_special = false`,
    /// `unparse_special = false`): with `add_space_prefix` the first token loses one leading
    /// space (only when it is text: after a BOS nothing is stripped, as in llama.cpp), and
    /// vocabs with `clean_spaces` get its clean-up. Invalid UTF-8 is replaced lossily.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for (i, &id) in ids.iter().enumerate() {
            let piece = self.token_bytes(id);
            let piece = match piece.first() {
                Some(b' ') if i == 0 && self.add_space_prefix => &piece[1..],
                _ => &piece[..],
            };
            bytes.extend_from_slice(piece);
        }
        if self.clean_spaces {
            bpe::clean_up_spaces(&mut bytes);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The raw vocabulary string of a token (`None` when out of range).
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.vocab.texts.get(id as usize).map(String::as_str)
    }

    /// The id of the token whose raw vocabulary string is `text`.
    pub fn token_to_id(&self, text: &str) -> Option<u32> {
        match &self.algorithm {
            Algorithm::Bpe(engine) => engine.token_to_id(text),
            Algorithm::Spm => self.vocab.ids.get(text).copied(),
        }
    }
}

/// C `isspace` on a byte (space, `\t`, `\n`, `\v`, `\f`, `\r`), used for LSTRIP/RSTRIP.
fn c_isspace(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0B | 0x0C | b'\r')
}

/// Streaming detokenizer: turns tokens into text as they come, never emitting a partial
/// UTF-8 character (its bytes wait for the rest; invalid bytes become U+FFFD).
#[derive(Debug, Clone, Default)]
pub struct StreamDecoder {
    pending: Vec<u8>,
}

impl StreamDecoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a token; returns the text that became complete (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> String {
        self.pending.extend_from_slice(&tok.token_bytes(id));
        let mut out = String::new();
        let mut consumed = 0;
        while consumed < self.pending.len() {
            match std::str::from_utf8(&self.pending[consumed..]) {
                Ok(s) => {
                    out.push_str(s);
                    consumed = self.pending.len();
                }
                Err(e) => {
                    let valid = consumed + e.valid_up_to();
                    out.push_str(&String::from_utf8_lossy(&self.pending[consumed..valid]));
                    consumed = valid;
                    match e.error_len() {
                        Some(n) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            consumed += n;
                        }
                        None => break, // an incomplete character at the end: wait
                    }
                }
            }
        }
        self.pending.drain(..consumed);
        out
    }

    /// Flushes what is left (an incomplete character becomes U+FFFD).
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}

#[cfg(test)]
mod tests;

/// A byte-level vocabulary (one token per byte, SmolLM2's pre-tokenizer)
/// with `extra` control tokens after the bytes, for other modules' tests.
#[cfg(test)]
pub(crate) fn byte_level_for_tests(extra: &[&str]) -> Tokenizer {
    let mut parts = bpe::tests::byte_level_parts("smollm", extra, &[]);
    let mut types = vec![1; parts.tokens.len()];
    for t in types.iter_mut().skip(256) {
        *t = 3;
    }
    parts.token_types = Some(types);
    Tokenizer::from_parts(parts).expect("a byte-level vocabulary")
}
