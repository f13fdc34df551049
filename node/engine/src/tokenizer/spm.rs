//! SentencePiece-style tokenizer of llama vocabs (`tokenizer.ggml.model == "llama"`), a port
//! of llama.cpp's `llm_tokenizer_spm_session`.
//!
//! Why hand-written: llama.cpp does not run SentencePiece itself but a greedy bigram merge over
//! the vocab's scores, and ids must match it exactly. The text arrives escaped (`' '` → `'▁'`,
//! with the optional leading space already added by the caller); it is split into UTF-8
//! characters, then the adjacent pair whose concatenation is a token with the highest score is
//! merged (leftmost on ties) until no pair is a token. Symbols that are not tokens fall back to
//! `<0xXX>` byte tokens.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use super::Vocab;

/// The escaped space of SentencePiece vocabs (U+2581).
pub(crate) const ESCAPED_SPACE: char = '\u{2581}';

/// One symbol of the working sequence: a byte range of the text, linked to its neighbours.
#[derive(Debug, Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

/// A candidate merge of two adjacent symbols.
#[derive(Debug)]
struct Bigram {
    left: usize,
    right: usize,
    score: f32,
    size: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Bigram {}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Bigram {
    /// Max-heap order of llama.cpp's comparator: higher score first, then the leftmost.
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .partial_cmp(&other.score)
            .unwrap_or(Ordering::Equal)
            .then_with(|| other.left.cmp(&self.left))
    }
}

/// Merge state of one text fragment.
struct Session<'a> {
    vocab: &'a Vocab,
    text: &'a str,
    symbols: Vec<Symbol>,
    queue: BinaryHeap<Bigram>,
}

impl Session<'_> {
    fn try_add_bigram(&mut self, left: Option<usize>, right: Option<usize>) {
        let (Some(left), Some(right)) = (left, right) else {
            return;
        };
        let (l, r) = (self.symbols[left], self.symbols[right]);
        let size = l.len + r.len;
        let Some(piece) = self.text.get(l.start..l.start + size) else {
            return;
        };
        let Some(&id) = self.vocab.ids.get(piece) else {
            return;
        };
        let score = self.vocab.scores.get(id as usize).copied().unwrap_or(0.0);
        self.queue.push(Bigram {
            left,
            right,
            score,
            size,
        });
    }
}

/// The token of byte `b`: `<0xXX>`, else the one-character token of an ASCII byte (llama.cpp's
/// `byte_to_token`), else `unk` (llama.cpp would throw).
fn byte_token(vocab: &Vocab, b: u8, unk: Option<u32>) -> Option<u32> {
    if let Some(&id) = vocab.ids.get(&format!("<0x{b:02X}>")) {
        return Some(id);
    }
    if b.is_ascii() {
        if let Some(&id) = vocab
            .ids
            .get(char::from(b).encode_utf8(&mut [0; 4]) as &str)
        {
            return Some(id);
        }
    }
    unk
}

/// Appends the ids of an escaped text fragment to `out`.
pub(crate) fn tokenize(vocab: &Vocab, text: &str, unk: Option<u32>, out: &mut Vec<u32>) {
    let mut symbols: Vec<Symbol> = Vec::with_capacity(text.len());
    for (start, c) in text.char_indices() {
        let index = symbols.len();
        symbols.push(Symbol {
            start,
            len: c.len_utf8(),
            prev: index.checked_sub(1),
            next: None,
        });
        if let Some(prev) = index.checked_sub(1) {
            symbols[prev].next = Some(index);
        }
    }
    if symbols.is_empty() {
        return;
    }
    let mut s = Session {
        vocab,
        text,
        symbols,
        queue: BinaryHeap::new(),
    };
    for i in 1..s.symbols.len() {
        s.try_add_bigram(Some(i - 1), Some(i));
    }
    while let Some(bigram) = s.queue.pop() {
        let (l, r) = (s.symbols[bigram.left], s.symbols[bigram.right]);
        // one of the symbols was merged since this bigram was queued
        if l.len == 0 || r.len == 0 || l.len + r.len != bigram.size {
            continue;
        }
        s.symbols[bigram.left].len += r.len;
        s.symbols[bigram.right].len = 0;
        s.symbols[bigram.left].next = r.next;
        if let Some(next) = r.next {
            s.symbols[next].prev = Some(bigram.left);
        }
        s.try_add_bigram(l.prev, Some(bigram.left));
        s.try_add_bigram(Some(bigram.left), r.next);
    }
    // Merged symbols are always tokens; only single characters can miss the vocab, and those
    // never match llama.cpp's `rev_merge` table (its keys span two symbols), so they go to bytes.
    let mut cursor = Some(0);
    while let Some(i) = cursor {
        let sym = s.symbols[i];
        let piece = text.get(sym.start..sym.start + sym.len).unwrap_or("");
        match vocab.ids.get(piece) {
            Some(&id) => out.push(id),
            None => out.extend(piece.bytes().filter_map(|b| byte_token(vocab, b, unk))),
        }
        cursor = sym.next;
    }
}

/// The text a normal SentencePiece token contributes: `'▁'` becomes `' '`.
pub(crate) fn unescape(text: &str) -> Vec<u8> {
    text.replace(ESCAPED_SPACE, " ").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::super::{Tokenizer, TokenizerParts};

    /// A tiny llama vocab: `<unk> <s> </s>`, the 256 byte tokens, then `pieces` with scores.
    fn llama_parts(pieces: &[(&str, f32)]) -> TokenizerParts {
        let mut tokens = vec!["<unk>".to_owned(), "<s>".to_owned(), "</s>".to_owned()];
        let mut types = vec![2, 3, 3];
        let mut scores = vec![0.0, 0.0, 0.0];
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(6);
            scores.push(0.0);
        }
        for (p, s) in pieces {
            tokens.push((*p).to_owned());
            types.push(1);
            scores.push(*s);
        }
        TokenizerParts {
            model: "llama".into(),
            tokens,
            scores: Some(scores),
            token_types: Some(types),
            ..TokenizerParts::default()
        }
    }

    fn id(tok: &Tokenizer, text: &str) -> u32 {
        tok.token_to_id(text).unwrap_or(u32::MAX)
    }

    const PIECES: &[(&str, f32)] = &[
        ("▁", -1.0),
        ("H", -5.0),
        ("e", -5.0),
        ("l", -5.0),
        ("o", -5.0),
        ("▁H", -2.0),
        ("ll", -1.5),
        ("▁He", -2.5),
        ("llo", -3.0),
        ("▁Hello", -4.0),
        ("lo", -0.5),
    ];

    #[test]
    fn merges_by_score_with_space_prefix() {
        let tok = Tokenizer::from_parts(llama_parts(PIECES)).unwrap();
        assert!(tok.adds_bos() && tok.bos() == Some(1) && tok.eos() == Some(2));
        // "▁Hello": "lo" (-0.5) merges first, which makes "ll" stale; then "▁H" (-2),
        // "▁He" (-2.5), "l"+"lo" = "llo" (-3) and finally "▁He"+"llo" = "▁Hello" (-4).
        let ids = tok.encode("Hello", true, false).unwrap();
        assert_eq!(ids, [1, id(&tok, "▁Hello")]);
        // llama.cpp strips the prefix space only when the first token is text.
        assert_eq!(tok.decode(&ids), " Hello");
        assert_eq!(tok.decode(&ids[1..]), "Hello");
    }

    #[test]
    fn byte_fallback_and_detokenize() {
        let tok = Tokenizer::from_parts(llama_parts(PIECES)).unwrap();
        let ids = tok.encode("é", false, false).unwrap();
        assert_eq!(ids, [id(&tok, "▁"), id(&tok, "<0xC3>"), id(&tok, "<0xA9>")]);
        assert_eq!(tok.token_bytes(id(&tok, "<0xC3>")).as_ref(), [0xC3]);
        assert_eq!(tok.decode(&ids), "é");
    }

    #[test]
    fn space_prefix_after_special_tokens() {
        let tok = Tokenizer::from_parts(llama_parts(PIECES)).unwrap();
        // parse_special: "</s>" is split out and the following text gets a prefix space again.
        let ids = tok.encode("H</s>H", false, true).unwrap();
        assert_eq!(ids, [id(&tok, "▁H"), 2, id(&tok, "▁H")]);
        let mut parts = llama_parts(PIECES);
        parts.add_space_prefix = Some(false);
        parts.add_bos = Some(false);
        let tok = Tokenizer::from_parts(parts).unwrap();
        assert_eq!(tok.encode("H", true, false).unwrap(), [id(&tok, "H")]);
        assert!(tok.encode("", true, true).unwrap().is_empty());
    }

    #[test]
    fn empty_text_with_bos() {
        let tok = Tokenizer::from_parts(llama_parts(PIECES)).unwrap();
        assert_eq!(tok.encode("", true, false).unwrap(), [1]);
        assert!(tok.is_eog(2));
    }
}
