//! Speculative decoding on one machine: the same tokens as without it.

use engine::{Engine, LoadOptions};

use super::fixture_arithmetic;

/// Speculation (prompt lookup, proposals verified in one pass) gives the
/// same tokens as plain generation: greedy and seeded, on text that copies
/// its prompt and on free writing; on the copy it proposes and keeps many.
#[test]
fn speculation_changes_no_token() {
    fixture_arithmetic();
    let engine = Engine::load(
        &shoal_tests::default_model(),
        &LoadOptions {
            max_context: 512,
            ..LoadOptions::default()
        },
        &mut |_, _| {},
    )
    .unwrap();
    let copy = "Rewrite this Python code with the same functions but add a docstring to \
                each function:\n\ndef add(a, b):\n    return a + b\n\ndef sub(a, b):\n    \
                return a - b\n\ndef mul(a, b):\n    return a * b\n";
    let prompts = [copy, "Write a short poem about the sea."];
    let run = |prompt: &str, sampling: engine::SamplingParams, speculate: Option<usize>| {
        let msgs = [engine::chat::Message::new("user", prompt)];
        let tokens = engine.chat_tokens(&msgs).unwrap();
        let opts = engine::GenerateOptions {
            max_tokens: 48,
            sampling,
            context: 512,
            constraint: None,
            speculate,
        };
        let mut out = Vec::new();
        let stats = engine
            .generate(&tokens, &opts, &mut |e| {
                if let engine::GenerateEvent::Token { id, .. } = e {
                    out.push(id);
                }
                true
            })
            .unwrap();
        (out, stats)
    };
    let seeded = engine::SamplingParams {
        temperature: 0.8,
        seed: 7,
        ..engine::SamplingParams::default()
    };
    for prompt in prompts {
        for sampling in [engine::SamplingParams::greedy(), seeded.clone()] {
            let (plain, _) = run(prompt, sampling.clone(), None);
            for k in [2, 5, 8] {
                let (spec, stats) = run(prompt, sampling.clone(), Some(k));
                assert_eq!(spec, plain, "k={k}, {prompt}");
                if prompt == copy && sampling.temperature == 0.0 {
                    assert!(
                        stats.accepted * 3 > stats.proposed && stats.accepted >= 10,
                        "k={k}: {}/{} accepted",
                        stats.accepted,
                        stats.proposed
                    );
                }
            }
            let (adaptive, _) = run(prompt, sampling.clone(), Some(0));
            assert_eq!(adaptive, plain, "adaptive, {prompt}");
        }
    }
}
