//! GPT-2 style byte-level BPE (`tokenizer.ggml.model == "gpt2"`), built on the `tokenizers`
//! crate so the merge loop is a well-tested one.
//!
//! Why it matches llama.cpp's `llm_tokenizer_bpe_session`: the pre-tokenizer is the same
//! sequence of regex splits that keep matches and gaps ([`super::pretokenize`]), then GPT-2
//! byte encoding; merges are applied lowest rank first, leftmost first on ties, per pre-token,
//! which is what both implementations do. `ignore_merges` (llama3 family) maps onto the
//! crate's option of the same meaning. Decoding (byte-level → bytes, `clean_spaces`) is done
//! here too, by hand, following llama.cpp's `token_to_piece` / `detokenize`.

use std::collections::HashSet;

use tokenizers::models::bpe::{Vocab as HfVocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{PreTokenizerWrapper, SplitDelimiterBehavior};

use super::{TokenizerError, Vocab};

/// A byte-level BPE tokenizer for raw text fragments (special tokens already split out).
pub(crate) struct BpeEngine {
    inner: tokenizers::Tokenizer,
}

fn backend(e: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::Backend(e.to_string())
}

impl BpeEngine {
    /// Builds the engine from the vocab, the GGUF merge strings (`"a b"`) and a regex list.
    pub(crate) fn new(
        vocab: &Vocab,
        merges: &[String],
        regexes: &[&str],
        ignore_merges: bool,
    ) -> Result<Self, TokenizerError> {
        let hf_vocab: HfVocab = vocab.ids.iter().map(|(k, v)| (k.clone(), *v)).collect();
        let model = BPE::builder()
            .vocab_and_merges(hf_vocab, usable_merges(vocab, merges))
            .ignore_merges(ignore_merges)
            .build()
            .map_err(backend)?;
        let mut steps = Vec::with_capacity(regexes.len() + 1);
        for re in regexes {
            let pattern = SplitPattern::Regex((*re).to_owned());
            let split =
                Split::new(pattern, SplitDelimiterBehavior::Isolated, false).map_err(backend)?;
            steps.push(PreTokenizerWrapper::Split(split));
        }
        steps.push(PreTokenizerWrapper::ByteLevel(ByteLevel::new(
            false, false, false,
        )));
        let mut inner = tokenizers::Tokenizer::new(model);
        inner.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(Sequence::new(steps))));
        Ok(Self { inner })
    }

    /// The id of a vocabulary string.
    pub(crate) fn token_to_id(&self, text: &str) -> Option<u32> {
        self.inner.token_to_id(text)
    }

    /// Appends the ids of `text` (plain text, no special-token parsing) to `out`.
    pub(crate) fn tokenize(&self, text: &str, out: &mut Vec<u32>) -> Result<(), TokenizerError> {
        let encoding = self.inner.encode_fast(text, false).map_err(backend)?;
        out.extend_from_slice(encoding.get_ids());
        Ok(())
    }
}

/// Splits a GGUF merge string like llama.cpp: at the first `' '` at byte 1 or later.
fn split_merge(merge: &str) -> Option<(&str, &str)> {
    let pos = merge.bytes().skip(1).position(|b| b == b' ')? + 1;
    Some((&merge[..pos], &merge[pos + 1..]))
}

/// The merges the `tokenizers` BPE model accepts: both halves and their concatenation must be
/// tokens (it refuses the vocab otherwise); duplicates keep their first (lowest) rank, as in
/// llama.cpp's `bpe_ranks.emplace`. A merge whose result is not a token could only produce a
/// symbol llama.cpp then splits back into bytes, so dropping it rarely changes ids.
fn usable_merges(vocab: &Vocab, merges: &[String]) -> Vec<(String, String)> {
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(merges.len());
    let mut dropped = 0usize;
    for merge in merges {
        let Some((a, b)) = split_merge(merge) else {
            dropped += 1;
            continue;
        };
        let usable = vocab.ids.contains_key(a)
            && vocab.ids.contains_key(b)
            && vocab.ids.contains_key(&format!("{a}{b}"));
        if !usable {
            dropped += 1;
            continue;
        }
        if seen.insert((a, b)) {
            out.push((a.to_owned(), b.to_owned()));
        }
    }
    if dropped > 0 {
        tracing::debug!(
            dropped,
            "BPE merges not usable with this vocab were skipped"
        );
    }
    out
}

/// Whether GPT-2's `bytes_to_unicode` maps byte `b` to the code point of the same value.
const fn is_direct_byte(b: u32) -> bool {
    matches!(b, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF)
}

/// Number of bytes GPT-2 shifts to code points 256.. (the non-printable ones).
const SHIFTED_BYTES: usize = 68;

/// `SHIFTED[n]` is the byte that code point `256 + n` stands for.
const SHIFTED: [u8; SHIFTED_BYTES] = {
    let mut table = [0u8; SHIFTED_BYTES];
    let mut n = 0;
    let mut b = 0u32;
    while b < 256 {
        if !is_direct_byte(b) {
            table[n] = b as u8;
            n += 1;
        }
        b += 1;
    }
    table
};

/// The byte a character of a byte-level token stands for (inverse of `bytes_to_unicode`).
fn char_to_byte(c: char) -> Option<u8> {
    let cp = u32::from(c);
    if cp < 256 {
        return is_direct_byte(cp).then_some(cp as u8);
    }
    SHIFTED.get(usize::try_from(cp - 256).ok()?).copied()
}

/// Decodes a byte-level token text to the bytes it stands for. Characters outside the
/// byte alphabet (llama.cpp prints an `[UNK_BYTE_..]` marker) are kept as their UTF-8.
pub(crate) fn byte_level_decode(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    for c in text.chars() {
        match char_to_byte(c) {
            Some(b) => out.push(b),
            None => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
        }
    }
    out
}

/// llama.cpp's `clean_spaces` post-processing of a detokenized sequence (three passes over
/// bytes: drop the space before `?!.,`, collapse `" ' "` to `"'"`, and drop the space before
/// `'s 'm 're 've`). Ported index for index, including its in-place quirks.
pub(crate) fn clean_up_spaces(text: &mut Vec<u8>) {
    // pass 1: " ?", " !", " .", " ,"
    let n = text.len();
    let mut total = usize::from(n > 0);
    for i in 1..n {
        let x = text[i];
        if text[i - 1] == b' ' && matches!(x, b'?' | b'!' | b'.' | b',') {
            total -= 1;
        }
        text[total] = x;
        total += 1;
    }
    text.truncate(total);

    // pass 2: " ' " -> "'"
    let n = text.len();
    let mut total = usize::from(n > 0);
    let mut i = 1;
    while i < n {
        let x = text[i];
        if x == b'\'' && i + 1 < n && text[i - 1] == b' ' && text[i + 1] == b' ' {
            total -= 1;
            i += 1;
            text[i] = 0;
        }
        text[total] = x;
        total += 1;
        i += 1;
    }
    text.truncate(total);

    // pass 3: " 's", " 'm", " 're", " 've"
    let n = text.len();
    let mut total = usize::from(n > 0);
    for i in 1..n {
        let x = text[i];
        if text[i - 1] == b' ' && x == b'\'' && i + 1 < n {
            let x1 = text[i + 1];
            if matches!(x1, b's' | b'm') {
                total -= 1;
            } else if i + 2 < n {
                let x2 = text[i + 2];
                if (x1 == b'r' || x1 == b'v') && x2 == b'e' {
                    total -= 1;
                }
            }
        }
        text[total] = x;
        total += 1;
    }
    text.truncate(total);
}

#[cfg(test)]
pub(super) mod tests {
    use super::super::{attr, Tokenizer, TokenizerParts};
    use super::*;

    /// GPT-2's byte alphabet as tokens 0..256, then `extra` tokens, with the given merges.
    pub(crate) fn byte_level_parts(pre: &str, extra: &[&str], merges: &[&str]) -> TokenizerParts {
        let mut tokens: Vec<String> = (0u32..256)
            .map(|b| {
                let cp = if is_direct_byte(b) {
                    b
                } else {
                    256 + SHIFTED.iter().position(|&s| u32::from(s) == b).unwrap_or(0) as u32
                };
                char::from_u32(cp).unwrap_or('?').to_string()
            })
            .collect();
        tokens.extend(extra.iter().map(|s| (*s).to_owned()));
        TokenizerParts {
            model: "gpt2".into(),
            pre: Some(pre.into()),
            tokens,
            merges: Some(merges.iter().map(|s| (*s).to_owned()).collect()),
            ..TokenizerParts::default()
        }
    }

    fn id(tok: &Tokenizer, text: &str) -> u32 {
        tok.token_to_id(text).unwrap_or(u32::MAX)
    }

    #[test]
    fn byte_alphabet_round_trips() {
        for b in 0u32..256 {
            let cp = if is_direct_byte(b) {
                b
            } else {
                256 + SHIFTED.iter().position(|&s| u32::from(s) == b).unwrap_or(0) as u32
            };
            let c = char::from_u32(cp).unwrap_or('?');
            assert_eq!(char_to_byte(c), Some(b as u8));
        }
        assert_eq!(byte_level_decode("Ġhello"), b" hello");
        assert_eq!(byte_level_decode("Ċ"), b"\n");
    }

    #[test]
    fn merges_and_smollm_digit_split() {
        let merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "Ġw o", "1 2"];
        let extra = ["he", "ll", "hell", "hello", "Ġw", "Ġwo", "12"];
        let tok = Tokenizer::from_parts(byte_level_parts("smollm", &extra, &merges)).unwrap();
        let ids = tok.encode("hello wo 12", false, false).unwrap();
        // smollm isolates every digit first, so "12" is never merged.
        let want = [
            id(&tok, "hello"),
            id(&tok, "Ġwo"),
            id(&tok, "Ġ"),
            id(&tok, "1"),
            id(&tok, "2"),
        ];
        assert_eq!(ids, want);
        assert_eq!(tok.decode(&ids), "hello wo 12");
        // gpt-2 keeps " 12" together as one pre-token; "Ġ" "12" after merging.
        let tok = Tokenizer::from_parts(byte_level_parts("gpt-2", &extra, &merges)).unwrap();
        let ids = tok.encode("12", false, false).unwrap();
        assert_eq!(ids, [id(&tok, "12")]);
    }

    #[test]
    fn ignore_merges_for_llama3() {
        // "abc" is a token but unreachable through merges.
        let parts = |pre: &str| byte_level_parts(pre, &["ab", "abc"], &["a b"]);
        let plain = Tokenizer::from_parts(parts("gpt-2")).unwrap();
        let ids = plain.encode("abc", false, false).unwrap();
        assert_eq!(ids, [id(&plain, "ab"), id(&plain, "c")]);
        let mut p = parts("llama-bpe");
        p.ids.bos = Some(0);
        let l3 = Tokenizer::from_parts(p).unwrap();
        assert!(l3.adds_bos());
        let ids = l3.encode("abc", true, false).unwrap();
        assert_eq!(ids, [0, id(&l3, "abc")]);
    }

    #[test]
    fn special_tokens_split_only_when_parsing() {
        let mut parts = byte_level_parts("smollm", &["<|im_start|>", "<|im_end|>"], &[]);
        let mut types = vec![1; parts.tokens.len()];
        types[256] = 3;
        types[257] = 3;
        parts.token_types = Some(types);
        let tok = Tokenizer::from_parts(parts).unwrap();
        let ids = tok.encode("<|im_start|>hi<|im_end|>", false, true).unwrap();
        assert_eq!(ids, [256, id(&tok, "h"), id(&tok, "i"), 257]);
        let plain = tok.encode("<|im_start|>", false, false).unwrap();
        assert_eq!(plain.len(), "<|im_start|>".len());
        assert!(tok.is_eog(257) && !tok.is_eog(256));
        assert!(tok.token_bytes(257).is_empty());
        assert_eq!(tok.decode(&ids), "hi");
        assert_ne!(tok.vocab.attrs[257] & attr::CONTROL, 0);
    }

    #[test]
    fn clean_spaces_passes() {
        let mut t = b"Hello , world ! I ' m here . It 's you 're".to_vec();
        clean_up_spaces(&mut t);
        assert_eq!(t, b"Hello, world! I'm here. It's you're".to_vec());
        let mut empty = Vec::new();
        clean_up_spaces(&mut empty);
        assert!(empty.is_empty());
    }

    #[test]
    fn merge_strings_split_like_llama_cpp() {
        assert_eq!(split_merge("Ġ t"), Some(("Ġ", "t")));
        assert_eq!(split_merge("  x"), Some((" ", "x")));
        assert_eq!(split_merge("ab"), None);
        assert_eq!(split_merge(""), None);
    }
}
