//! Engine-level tests on real and synthetic GGUFs: layer-range splits equal
//! the whole model, tokenizer round-trips, context limits.

use std::ops::Range;
use std::path::Path;

use candle_core::quantized::GgmlDType;
use engine::{BatchSeq, Engine, KvCache, LoadOptions, LogitsFor, Stage, StageInput, StageOutput};
use sharding::{GgufFile, ModelLayout};
use shoal_tests::synth::{write_synthetic_gguf, SynthSpec};

/// Runs `steps` (token batches) through a pipeline of stages split at
/// `cuts`, each stage with its own cache, and returns the logits per step.
fn run_pipeline(path: &Path, cuts: &[usize], steps: &[Vec<u32>], want: LogitsFor) -> Vec<Vec<f32>> {
    let gguf = GgufFile::open(path).unwrap();
    let layout = ModelLayout::from_gguf(&gguf).unwrap();
    let n = layout.layers.len();
    let mut bounds = vec![0];
    bounds.extend_from_slice(cuts);
    bounds.push(n);
    let opts = LoadOptions {
        max_context: 256,
        ..LoadOptions::default()
    };
    let stages: Vec<Stage> = bounds
        .windows(2)
        .map(|w| Stage::load(&gguf, &layout, w[0]..w[1], &opts).unwrap())
        .collect();
    let mut caches: Vec<KvCache> = stages.iter().map(|s| s.new_cache(256)).collect();
    let mut out = Vec::new();
    for tokens in steps {
        let mut input = StageInput::Tokens(tokens);
        let mut logits = None;
        for (stage, cache) in stages.iter().zip(caches.iter_mut()) {
            match stage.forward(input, cache, want).unwrap() {
                StageOutput::Hidden(h) => input = StageInput::Hidden(h),
                StageOutput::Logits(l) => {
                    logits = Some(l);
                    input = StageInput::Tokens(&[]);
                }
            }
        }
        out.push(
            logits
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
        );
    }
    out
}

fn assert_splits_equal(path: &Path, cut_sets: &[Vec<usize>]) {
    // A prompt, then decode steps that reuse the KV cache, then a second
    // multi-token chunk on top of the cache.
    let steps = vec![
        vec![5, 17, 42, 99, 3, 250, 7, 8, 9],
        vec![11],
        vec![12],
        vec![40, 41, 42],
        vec![13],
    ];
    for want in [LogitsFor::Last, LogitsFor::All] {
        let full = run_pipeline(path, &[], &steps, want);
        for cuts in cut_sets {
            let split = run_pipeline(path, cuts, &steps, want);
            for (i, (a, b)) in full.iter().zip(&split).enumerate() {
                assert_eq!(a.len(), b.len());
                let diff = a
                    .iter()
                    .zip(b)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max);
                assert!(
                    diff == 0.0,
                    "{}: cuts {cuts:?} step {i}: max |diff| {diff}",
                    path.display()
                );
            }
        }
    }
}

#[test]
fn real_model_splits_equal_full_run() {
    let path = shoal_tests::default_model();
    assert_splits_equal(
        &path,
        &[vec![1], vec![15], vec![29], vec![7, 22], vec![10, 20]],
    );
}

#[test]
fn synthetic_models_of_every_quant_type_split_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let types = [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q8_0,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
        GgmlDType::F16,
        GgmlDType::F32,
    ];
    for (i, dtype) in types.into_iter().enumerate() {
        let path = dir.path().join(format!("m{i}.gguf"));
        let spec = SynthSpec {
            dtype,
            n_layers: 3,
            seed: i as u64,
            ..SynthSpec::default()
        };
        write_synthetic_gguf(&path, &spec).unwrap();
        assert_splits_equal(&path, &[vec![1], vec![1, 2]]);
    }
    // Qwen2-style: q/k/v biases, NeoX RoPE, untied head.
    let path = dir.path().join("qwen2.gguf");
    let spec = SynthSpec {
        architecture: "qwen2".into(),
        qkv_bias: true,
        untied_head: true,
        dtype: GgmlDType::Q8_0,
        ..SynthSpec::default()
    };
    write_synthetic_gguf(&path, &spec).unwrap();
    assert_splits_equal(&path, &[vec![2]]);
}

/// Three sequences stepped together through two stages: one still in its
/// prompt (a chunk long enough for the tiled attention kernel), two
/// decoding at different positions. Returns each sequence's logits per round.
fn run_batched(path: &Path, rounds: &[Vec<Vec<u32>>], together: bool) -> Vec<Vec<Vec<f32>>> {
    let gguf = GgufFile::open(path).unwrap();
    let layout = ModelLayout::from_gguf(&gguf).unwrap();
    let n = layout.layers.len();
    let opts = LoadOptions {
        max_context: 256,
        ..LoadOptions::default()
    };
    let stages = [
        Stage::load(&gguf, &layout, 0..n / 2, &opts).unwrap(),
        Stage::load(&gguf, &layout, n / 2..n, &opts).unwrap(),
    ];
    let n_seqs = rounds[0].len();
    let mut caches: Vec<Vec<KvCache>> = stages
        .iter()
        .map(|s| (0..n_seqs).map(|_| s.new_cache(256)).collect())
        .collect();
    let logits_of = |out: StageOutput| match out {
        StageOutput::Logits(l) => l,
        StageOutput::Hidden(_) => panic!("last stage gives logits"),
    };
    let rows_of = |t: candle_core::Tensor| -> Vec<Vec<f32>> { t.to_vec2::<f32>().unwrap() };
    let mut out = Vec::new();
    for round in rounds {
        if together {
            let all: Vec<u32> = round.concat();
            let mut seqs: Vec<BatchSeq<'_>> = caches[0]
                .iter_mut()
                .zip(round)
                .map(|(c, t)| BatchSeq::new(c, t.len(), LogitsFor::Last))
                .collect();
            let StageOutput::Hidden(h) = stages[0]
                .forward_batch(StageInput::Tokens(&all), &mut seqs)
                .unwrap()
            else {
                panic!("first stage gives hidden states")
            };
            let mut seqs: Vec<BatchSeq<'_>> = caches[1]
                .iter_mut()
                .zip(round)
                .map(|(c, t)| BatchSeq::new(c, t.len(), LogitsFor::Last))
                .collect();
            let l = logits_of(
                stages[1]
                    .forward_batch(StageInput::Hidden(h), &mut seqs)
                    .unwrap(),
            );
            out.push(rows_of(l));
        } else {
            let mut rows = Vec::new();
            for (i, tokens) in round.iter().enumerate() {
                let StageOutput::Hidden(h) = stages[0]
                    .forward(
                        StageInput::Tokens(tokens),
                        &mut caches[0][i],
                        LogitsFor::Last,
                    )
                    .unwrap()
                else {
                    panic!("first stage gives hidden states")
                };
                let l = stages[1]
                    .forward(StageInput::Hidden(h), &mut caches[1][i], LogitsFor::Last)
                    .unwrap();
                rows.extend(rows_of(logits_of(l)));
            }
            out.push(rows);
        }
    }
    out
}

fn assert_batching_is_exact(path: &Path) {
    let long: Vec<u32> = (0..70).map(|i| (i * 37 + 5) % 250).collect();
    let rounds = vec![
        vec![vec![5, 17, 42], vec![9, 8, 7, 6, 5], vec![1]],
        vec![long, vec![11], vec![2, 3]],
        vec![vec![12], vec![13], vec![14]],
        vec![vec![40, 41], vec![15], vec![16]],
    ];
    let alone = run_batched(path, &rounds, false);
    let together = run_batched(path, &rounds, true);
    assert_eq!(alone, together, "{}: batched logits differ", path.display());
}

#[test]
fn batched_sequences_equal_one_at_a_time() {
    assert_batching_is_exact(&shoal_tests::default_model());
    let dir = tempfile::tempdir().unwrap();
    for (i, dtype) in [GgmlDType::Q8_0, GgmlDType::Q4K, GgmlDType::F16]
        .into_iter()
        .enumerate()
    {
        let path = dir.path().join(format!("b{i}.gguf"));
        let spec = SynthSpec {
            dtype,
            n_layers: 2,
            seed: 40 + i as u64,
            ..SynthSpec::default()
        };
        write_synthetic_gguf(&path, &spec).unwrap();
        assert_batching_is_exact(&path);
    }
}

#[test]
fn stage_maps_only_its_layers() {
    let path = shoal_tests::default_model();
    let gguf = GgufFile::open(&path).unwrap();
    let layout = ModelLayout::from_gguf(&gguf).unwrap();
    let mid: Range<usize> = 10..20;
    let stage = Stage::load(&gguf, &layout, mid.clone(), &LoadOptions::default()).unwrap();
    assert_eq!(stage.weight_bytes(), layout.stage_bytes(mid.clone()));
    assert!(!stage.is_first() && !stage.is_last());
    // A middle stage holds a third of the blocks and neither the embedding nor the head.
    let blocks: u64 = layout.layers[mid].iter().map(|l| l.bytes()).sum();
    assert_eq!(stage.weight_bytes(), blocks);
    assert!(stage.weight_bytes() * 3 < gguf.file_len());
}

fn load_default() -> Engine {
    let path = shoal_tests::default_model();
    Engine::load(
        &path,
        &LoadOptions {
            max_context: 64,
            ..LoadOptions::default()
        },
        &mut |_, _| {},
    )
    .unwrap()
}

#[test]
fn prompt_longer_than_context_is_an_error() {
    let engine = load_default();
    let prompt: Vec<u32> = (0..100).collect();
    let opts = engine::GenerateOptions {
        max_tokens: 4,
        sampling: engine::SamplingParams::greedy(),
        context: 64,
    };
    let err = engine.generate(&prompt, &opts, &mut |_| true).unwrap_err();
    assert!(err.to_string().contains("context full"), "{err}");
}

#[test]
fn tokenizer_round_trips_and_chat_template_renders() {
    let engine = load_default();
    let tok = engine.tokenizer();
    for text in [
        "Hello, world!",
        "  two  spaces\tand tabs\n",
        "naïve café — 東京 🦀",
        "1234567 + 89 = ?",
    ] {
        let ids = tok.encode(text, false, false).unwrap();
        assert_eq!(tok.decode(&ids), text);
    }
    let ids = engine
        .chat_tokens(&[engine::chat::Message {
            role: "user".into(),
            content: "Hi".into(),
        }])
        .unwrap();
    // ChatML: starts with <|im_start|> (id 1) and ends ready for the assistant.
    assert_eq!(ids[0], 1);
    assert!(tok.decode(&ids).ends_with("assistant\n"));
}

#[test]
fn greedy_generation_is_deterministic_and_stops() {
    let engine = load_default();
    let prompt = engine.raw_tokens("The capital of France is").unwrap();
    let opts = engine::GenerateOptions {
        max_tokens: 12,
        sampling: engine::SamplingParams::greedy(),
        context: 64,
    };
    let run = || {
        let mut text = String::new();
        let stats = engine
            .generate(&prompt, &opts, &mut |ev| {
                if let engine::GenerateEvent::Token { text: t, .. } = ev {
                    text.push_str(t);
                }
                true
            })
            .unwrap();
        (text, stats.gen_tokens)
    };
    let (a, n) = run();
    assert_eq!(run().0, a);
    assert!(n <= 12 && a.contains("Paris"), "{a:?}");
}
