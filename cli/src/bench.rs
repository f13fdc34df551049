//! `shoal bench`: throughput like `llama-bench` — a prompt-processing test
//! (`-p` tokens in one batch) and a generation test (`-n` tokens one at a
//! time), each from an empty cache, repeated, reported as tokens/s.

use clap::Args;
use engine::LogitsFor;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::common::ModelArgs;

/// `shoal bench` flags.
#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt tokens of the prompt-processing test (0 = skip).
    #[arg(short = 'p', long = "n-prompt", default_value_t = 512)]
    n_prompt: usize,
    /// Tokens of the generation test (0 = skip).
    #[arg(short = 'n', long = "n-gen", default_value_t = 128)]
    n_gen: usize,
    /// Repetitions of each test.
    #[arg(short = 'r', long, default_value_t = 5)]
    repetitions: usize,
    /// Print a JSON array (llama-bench's `-o json` fields) instead of a table.
    #[arg(long)]
    json: bool,
    /// Benchmark a running cluster through this node's HTTP API instead,
    /// each level beside the simulator's prediction (-m names its model file).
    #[arg(long, value_name = "URL")]
    cluster: Option<String>,
    /// Concurrent streams, one level each (--cluster).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    streams: Vec<usize>,
    /// Requests each stream sends one after another (--cluster).
    #[arg(long, default_value_t = 2)]
    requests_per_stream: usize,
    /// Every node of the cluster runs on this machine: the simulator lets
    /// them share its cores (--cluster).
    #[arg(long)]
    same_machine: bool,
    /// One-way link latency the simulator assumes, ms (--cluster; default:
    /// the nodes' probes).
    #[arg(long)]
    link_latency_ms: Option<f64>,
    /// Link bandwidth the simulator assumes, Mbit/s (--cluster).
    #[arg(long)]
    link_mbit: Option<f64>,
    /// Predict from the nodes' start-up calibration alone, without fitting
    /// their speed to the 1-stream level first (--cluster).
    #[arg(long)]
    no_fit: bool,
}

/// One result row; field names follow llama-bench's JSON.
#[derive(Serialize, Debug)]
struct Row {
    model_filename: String,
    model_size: u64,
    n_threads: usize,
    n_prompt: usize,
    n_gen: usize,
    avg_ns: u64,
    stddev_ns: u64,
    avg_ts: f64,
    stddev_ts: f64,
    samples_ts: Vec<f64>,
}

pub fn main(args: BenchArgs) -> anyhow::Result<()> {
    if let Some(url) = &args.cluster {
        let model = args.model.path()?;
        anyhow::ensure!(
            (1..=100).contains(&args.requests_per_stream),
            "--requests-per-stream: 1 to 100"
        );
        return crate::bench_cluster::run(&crate::bench_cluster::ClusterBench {
            url,
            model: &model,
            streams: &args.streams,
            requests_per_stream: args.requests_per_stream,
            tokens: args.n_gen,
            json: args.json,
            same_machine: args.same_machine,
            link_latency_ms: args.link_latency_ms,
            link_mbit: args.link_mbit,
            fit: !args.no_fit,
        });
    }
    anyhow::ensure!(args.repetitions >= 1, "--repetitions must be at least 1");
    let threads = crate::common::set_threads(args.model.threads)?;
    let engine = args.model.load_with_pool(true)?;
    let path = engine.path().to_path_buf();
    let ctx = engine.stage().max_context();
    anyhow::ensure!(
        args.n_prompt + args.n_gen < ctx,
        "-p + -n exceed the context ({ctx}); raise --ctx"
    );
    let vocab = engine.layout().config.vocab_size as u32;
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let prompt: Vec<u32> = (0..args.n_prompt.max(1))
        .map(|_| rng.random_range(0..vocab))
        .collect();
    // Warm-up, as llama-bench does: first-touch costs are not throughput.
    let mut cache = engine.new_cache(ctx);
    engine.step(&prompt[..prompt.len().min(8)], &mut cache, LogitsFor::Last)?;
    let mut rows = Vec::new();
    let mk_row = |n_prompt, n_gen, samples_ns: Vec<u64>| {
        let n = (n_prompt + n_gen) as f64;
        let ts: Vec<f64> = samples_ns.iter().map(|&ns| n * 1e9 / ns as f64).collect();
        Row {
            model_filename: path.display().to_string(),
            model_size: engine.stage().weight_bytes(),
            n_threads: threads,
            n_prompt,
            n_gen,
            avg_ns: mean(&samples_ns.iter().map(|&v| v as f64).collect::<Vec<_>>()) as u64,
            stddev_ns: stddev(&samples_ns.iter().map(|&v| v as f64).collect::<Vec<_>>()) as u64,
            avg_ts: mean(&ts),
            stddev_ts: stddev(&ts),
            samples_ts: ts,
        }
    };
    if args.n_prompt > 0 {
        let mut samples = Vec::new();
        for _ in 0..args.repetitions {
            let mut cache = engine.new_cache(ctx);
            let t = std::time::Instant::now();
            engine.prefill(&prompt, &mut cache)?;
            samples.push(t.elapsed().as_nanos() as u64);
        }
        rows.push(mk_row(args.n_prompt, 0, samples));
    }
    if args.n_gen > 0 {
        let mut samples = Vec::new();
        for _ in 0..args.repetitions {
            let mut cache = engine.new_cache(ctx);
            let mut tok = prompt[0];
            let t = std::time::Instant::now();
            for _ in 0..args.n_gen {
                let logits = engine
                    .step(&[tok], &mut cache, LogitsFor::Last)?
                    .to_vec1::<f32>()?;
                tok = engine::sampling::argmax(&logits);
            }
            samples.push(t.elapsed().as_nanos() as u64);
        }
        rows.push(mk_row(0, args.n_gen, samples));
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!("| model | threads | test | t/s |");
        println!("| --- | ---: | ---: | ---: |");
        for r in &rows {
            let test = if r.n_prompt > 0 {
                format!("pp{}", r.n_prompt)
            } else {
                format!("tg{}", r.n_gen)
            };
            println!(
                "| {} | {} | {test} | {:.2} ± {:.2} |",
                engine.layout().config.name.as_deref().unwrap_or("?"),
                r.n_threads,
                r.avg_ts,
                r.stddev_ts
            );
        }
    }
    Ok(())
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

fn stddev(v: &[f64]) -> f64 {
    if v.len() < 2 {
        return 0.0;
    }
    let m = mean(v);
    (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64).sqrt()
}
