//! Grammars over a byte-level vocabulary: random logits, masked, must
//! always give output that parses and validates.

use super::*;
use crate::sampling::{Sampler, SamplingParams};
use crate::tokenizer::byte_level_for_tests;

fn grammars() -> (Grammars, Arc<Tokenizer>) {
    let tok = Arc::new(byte_level_for_tests(&["<|im_start|>", "<|im_end|>"]));
    (Grammars::new(tok.clone()).unwrap(), tok)
}

/// Draws up to `max` tokens from seeded noise through the guide; the text
/// and whether it ended by an end-of-generation token.
fn run(g: &mut Guide, tok: &Tokenizer, seed: u64, max: usize) -> (String, bool) {
    let mut sampler = Sampler::new(SamplingParams {
        temperature: 1.0,
        seed,
        ..SamplingParams::default()
    });
    let mut out = Vec::new();
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for _ in 0..max {
        let mut logits: Vec<f32> = (0..tok.vocab_size() + 3)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state % 1000) as f32 / 100.0
            })
            .collect();
        g.mask(&mut logits).unwrap();
        let t = sampler.sample(&logits, &out);
        g.advance(t).unwrap();
        if tok.is_eog(t) {
            return (tok.decode(&out), true);
        }
        out.push(t);
    }
    (tok.decode(&out), false)
}

#[test]
fn json_schema_output_always_parses_and_validates() {
    let (grammars, tok) = grammars();
    let schema = r#"{"type":"object","properties":{
        "name":{"type":"string","maxLength":8},
        "age":{"type":"integer","minimum":0,"maximum":150},
        "tags":{"type":"array","items":{"enum":["a","b"]},"maxItems":3}},
        "required":["name","age","tags"],"additionalProperties":false}"#;
    for seed in 0..20 {
        let mut g = grammars
            .guide(&Constraint::JsonSchema(schema.into()))
            .unwrap();
        let (text, ended) = run(&mut g, &tok, seed, 400);
        assert!(ended, "seed {seed}: did not end: {text}");
        let v: serde_json::Value = serde_json::from_str(&text).expect(&text);
        let age = v["age"].as_i64().unwrap();
        assert!((0..=150).contains(&age), "{text}");
        assert!(v["name"].as_str().unwrap().chars().count() <= 8, "{text}");
        assert!(v["tags"].as_array().unwrap().len() <= 3, "{text}");
        assert_eq!(v.as_object().unwrap().len(), 3, "{text}");
    }
}

#[test]
fn lark_grammar_with_embedded_json_is_followed() {
    let (grammars, tok) = grammars();
    let lark = r#"start: "<tool_call>" call "</tool_call>"
call: %json {"type":"object","properties":{"name":{"const":"get_weather"},"arguments":{"type":"object","properties":{"city":{"type":"string","maxLength":10}},"required":["city"],"additionalProperties":false}},"required":["name","arguments"],"additionalProperties":false,"x-guidance":{"whitespace_flexible":false}}"#;
    for seed in 0..5 {
        let mut g = grammars.guide(&Constraint::Lark(lark.into())).unwrap();
        let (text, ended) = run(&mut g, &tok, seed, 400);
        assert!(ended, "{text}");
        let inner = text
            .strip_prefix("<tool_call>")
            .and_then(|t| t.strip_suffix("</tool_call>"))
            .expect(&text);
        let v: serde_json::Value = serde_json::from_str(inner).expect(inner);
        assert_eq!(v["name"], "get_weather");
        assert!(v["arguments"]["city"].is_string());
    }
}

#[test]
fn a_replay_reaches_the_same_state() {
    let (grammars, tok) = grammars();
    let c = Constraint::JsonSchema(r#"{"type":"array","items":{"type":"integer"}}"#.into());
    let mut first = grammars.guide(&c).unwrap();
    let (text, _) = run(&mut first, &tok, 3, 12);
    let ids = tok.encode(&text, false, false).unwrap();
    let mut again = grammars.guide(&c).unwrap();
    again.advance_all(&ids).unwrap();
    let mut a = vec![0.0; tok.vocab_size()];
    let mut b = a.clone();
    first.mask(&mut a).unwrap();
    again.mask(&mut b).unwrap();
    assert_eq!(a, b);
}

#[test]
fn bad_grammars_are_errors_not_panics() {
    let (grammars, _) = grammars();
    for bad in [
        Constraint::JsonSchema("{".into()),
        Constraint::JsonSchema(r#"{"type":"nonsense"}"#.into()),
        Constraint::JsonSchema(r##"{"$ref":"#/nowhere"}"##.into()),
        Constraint::Lark("start: undefined_rule".into()),
        Constraint::Lark("start: (".into()),
    ] {
        assert!(
            matches!(grammars.guide(&bad), Err(GrammarError::Invalid(_))),
            "{bad:?}"
        );
    }
}

#[test]
fn a_token_outside_the_mask_is_refused() {
    let (grammars, tok) = grammars();
    let mut g = grammars
        .guide(&Constraint::JsonSchema(r#"{"type":"integer"}"#.into()))
        .unwrap();
    let letter = tok.encode("x", false, false).unwrap()[0];
    assert!(g.advance(letter).is_err());
}

#[test]
fn logits_past_the_vocabulary_are_masked() {
    let (grammars, tok) = grammars();
    let mut g = grammars
        .guide(&Constraint::JsonSchema(r#"{"type":"boolean"}"#.into()))
        .unwrap();
    let mut logits = vec![1.0; tok.vocab_size() + 5];
    g.mask(&mut logits).unwrap();
    assert!(logits[tok.vocab_size()..]
        .iter()
        .all(|l| *l == f32::NEG_INFINITY));
    let allowed: Vec<usize> = (0..logits.len()).filter(|&i| logits[i] > 0.0).collect();
    let t = tok.encode("t", false, false).unwrap()[0] as usize;
    let f = tok.encode("f", false, false).unwrap()[0] as usize;
    assert_eq!(allowed, vec![f.min(t), f.max(t)]);
}
