//! Tests of the tokenizer's public behaviour (special-token splitting, end-of-generation
//! detection, limits, streaming) on small in-memory vocabs, plus an opt-in conformance run
//! against llama.cpp's own vocab test files.

use super::*;

fn assert_send_sync<T: Send + Sync>() {}

/// A byte-level vocab with the given extra tokens (all control).
fn with_specials(extra: &[&str], pre: &str) -> Tokenizer {
    let mut parts = bpe::tests::byte_level_parts(pre, extra, &[]);
    let mut types = vec![1; parts.tokens.len()];
    for t in types.iter_mut().skip(256) {
        *t = 3;
    }
    parts.token_types = Some(types);
    Tokenizer::from_parts(parts).unwrap()
}

#[test]
fn tokenizer_is_send_sync() {
    assert_send_sync::<Tokenizer>();
    assert_send_sync::<StreamDecoder>();
}

#[test]
fn longest_special_token_wins() {
    let tok = with_specials(&["<a>", "<a><b>"], "smollm");
    let ids = tok.encode("x<a><b><a>", false, true).unwrap();
    assert_eq!(ids, [tok.token_to_id("x").unwrap(), 257, 256]);
}

#[test]
fn eog_detection_by_text() {
    let tok = with_specials(
        &["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<fim_pad>"],
        "smollm",
    );
    let eog: Vec<u32> = tok.eog_ids().collect();
    // 11 is gpt2's default EOS id (no eos key here), which llama.cpp also counts.
    assert_eq!(eog, [11, 256, 258, 259]);
    assert_eq!(tok.eot(), Some(256));
    assert!(!tok.is_eog(u32::MAX));
    assert!(tok.token_bytes(u32::MAX).is_empty());
    assert_eq!(tok.token_text(258), Some("<|im_end|>"));
    assert_eq!(tok.token_bytes_special(258).as_ref(), b"<|im_end|>");
    assert!(tok.token_text(100_000).is_none());
}

#[test]
fn input_limit() {
    let tok = with_specials(&[], "smollm");
    let big = "a".repeat(MAX_INPUT_BYTES + 1);
    assert!(matches!(
        tok.encode(&big, false, false),
        Err(TokenizerError::InputTooLarge { .. })
    ));
}

#[test]
fn unsupported_models_are_errors() {
    let mut parts = bpe::tests::byte_level_parts("smollm", &[], &[]);
    parts.model = "bert".into();
    let err = Tokenizer::from_parts(parts).unwrap_err();
    assert_eq!(
        err.to_string(),
        "unsupported tokenizer model 'bert' (supported: gpt2, llama)"
    );
    let parts = bpe::tests::byte_level_parts("gemma4", &[], &[]);
    assert!(matches!(
        Tokenizer::from_parts(parts),
        Err(TokenizerError::UnsupportedPre(_))
    ));
    // unknown pre names fall back to the GPT-2 regex
    let parts = bpe::tests::byte_level_parts("no-such-pre", &[], &[]);
    assert!(Tokenizer::from_parts(parts).is_ok());
}

#[test]
fn stream_decoder_holds_partial_characters() {
    // "é" split over two byte tokens
    let tok = with_specials(&[], "smollm");
    let ids = tok.encode("é!", false, false).unwrap();
    assert_eq!(ids.len(), 3);
    let mut dec = StreamDecoder::new();
    assert_eq!(dec.push(&tok, ids[0]), "");
    assert_eq!(dec.push(&tok, ids[1]), "é");
    assert_eq!(dec.push(&tok, ids[2]), "!");
    assert_eq!(dec.push(&tok, ids[0]), "");
    assert_eq!(dec.finish(), "\u{FFFD}");
    assert_eq!(dec.finish(), "");
    // an impossible byte (0xFF) is replaced at once
    let ff = tok.token_to_id("ÿ").unwrap();
    assert_eq!(dec.push(&tok, ff), "\u{FFFD}");
}
