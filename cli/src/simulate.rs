//! `shoal simulate`: what a cluster described in a scenario file would do
//! (see the `simulations` crate), as a table or JSON; and `--project`, the
//! projections document's numbers and charts for several offices and models.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use serde::Serialize;
use simulations::svg::{bar_chart, Bars};
use simulations::{simulate, Report, Scenario};

/// `shoal simulate` flags.
#[derive(Args, Debug)]
pub struct SimulateArgs {
    /// Scenario files (TOML; see simulations/scenarios/).
    #[arg(required = true)]
    scenarios: Vec<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Use this named model shape instead of the scenario's (e.g. llama-3-8b).
    #[arg(long)]
    model: Option<String>,
    /// Quant type for --model (default q4_k_m).
    #[arg(long)]
    quant: Option<String>,
    /// Closed-loop clients instead of the scenario's load.
    #[arg(long, conflicts_with = "rate")]
    streams: Option<usize>,
    /// Open-loop arrivals per second instead of the scenario's load.
    #[arg(long)]
    rate: Option<f64>,
    /// Requests in all.
    #[arg(long)]
    requests: Option<usize>,
    /// One-way latency of every link, ms (pairs keep their own).
    #[arg(long)]
    latency_ms: Option<f64>,
    /// Speculative decoding with this per-token acceptance (0..1): the
    /// proposal length adapts as on a node.
    #[arg(long, value_name = "A")]
    speculation_acceptance: Option<f64>,
    /// Project every scenario with each of these models (comma-separated
    /// shapes) and write charts into this directory; prints a Markdown table.
    #[arg(long, value_name = "DIR", requires = "models")]
    project: Option<PathBuf>,
    /// Models for --project.
    #[arg(long, value_delimiter = ',')]
    models: Vec<String>,
}

pub fn main(args: SimulateArgs) -> anyhow::Result<()> {
    if let Some(dir) = &args.project {
        return project(&args, dir);
    }
    let mut out = Vec::new();
    for path in &args.scenarios {
        let (mut s, dir) = Scenario::load(path)?;
        apply(&args, &mut s, args.model.as_deref());
        let (cluster, load) = s.resolve(&dir)?;
        let report = simulate(&cluster, &load).with_context(|| path.display().to_string())?;
        if !args.json {
            if let Some(name) = &s.name {
                println!("== {name}");
            }
            println!("{report}\n");
        }
        out.push(Named {
            scenario: s.name.clone().unwrap_or_else(|| path.display().to_string()),
            report,
        });
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}

#[derive(Serialize)]
struct Named {
    scenario: String,
    #[serde(flatten)]
    report: Report,
}

/// The command line's overrides.
fn apply(args: &SimulateArgs, s: &mut Scenario, model: Option<&str>) {
    if let Some(m) = model {
        s.model.shape = Some(m.to_string());
        s.model.gguf = None;
        if args.quant.is_some() {
            s.model.quant = args.quant.clone();
        }
    }
    if let Some(n) = args.streams {
        s.load.streams = Some(n);
        s.load.rate_per_s = None;
    }
    if let Some(r) = args.rate {
        s.load.rate_per_s = Some(r);
        s.load.streams = None;
    }
    if args.requests.is_some() {
        s.load.requests = args.requests;
    }
    if let Some(l) = args.latency_ms {
        s.links.latency_ms = l;
    }
    if args.speculation_acceptance.is_some() {
        s.load.speculation_acceptance = args.speculation_acceptance;
    }
}

/// One office × model of the projections.
#[derive(Serialize)]
struct Projection {
    office: String,
    model: String,
    /// `None`: does not fit in the office's memory.
    single: Option<Report>,
    loaded: Option<Report>,
    /// Share of a single stream's per-token time spent on the network.
    network_share: Option<f64>,
    why_not: Option<String>,
}

fn project(args: &SimulateArgs, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
    let mut rows: Vec<Projection> = Vec::new();
    let mut offices = Vec::new();
    for path in &args.scenarios {
        let (base, sdir) = Scenario::load(path)?;
        let office = base
            .name
            .clone()
            .unwrap_or_else(|| path.display().to_string());
        offices.push(office.clone());
        for model in &args.models {
            let mut s = base.clone();
            apply(args, &mut s, Some(model));
            let (cluster, load) = s.resolve(&sdir)?;
            let single_load = simulations::Load {
                streams: Some(1),
                rate_per_s: None,
                requests: 2,
                ..load.clone()
            };
            let single = simulate(&cluster, &single_load);
            let mut free = cluster.clone();
            for row in &mut free.links {
                for l in row.iter_mut() {
                    l.spec.latency_us = 0.0;
                    l.spec.bytes_per_second = 1e15;
                    l.jitter_us = 0.0;
                }
            }
            // Same split on a free network: what the links cost.
            let network_share = match &single {
                Ok(r) => {
                    free.split = Some(cluster.split_of(r));
                    let ideal = simulate(&free, &single_load)?;
                    Some(1.0 - ideal.summary.token_ms.mean / r.summary.token_ms.mean.max(1e-9))
                }
                Err(_) => None,
            };
            let loaded = simulate(&cluster, &load);
            rows.push(Projection {
                office: office.clone(),
                model: model.clone(),
                why_not: single.as_ref().err().map(|e| e.to_string()),
                single: single.ok(),
                loaded: loaded.ok(),
                network_share,
            });
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print_table(&rows);
    }
    let chart = |title: &str, unit: &str, f: &dyn Fn(&Projection) -> Option<f64>| Bars {
        title: title.into(),
        unit: unit.into(),
        categories: args.models.clone(),
        series: offices
            .iter()
            .map(|o| {
                let v = args
                    .models
                    .iter()
                    .map(|m| {
                        rows.iter()
                            .find(|r| &r.office == o && &r.model == m)
                            .and_then(f)
                    })
                    .collect();
                (o.clone(), v)
            })
            .collect(),
    };
    let charts = [
        (
            "projection-tokens-per-s.svg",
            chart("One stream: tokens per second", "tok/s", &|r| {
                r.single
                    .as_ref()
                    .map(|s| 1e3 / s.summary.token_ms.mean.max(1e-9))
            }),
        ),
        (
            "projection-throughput.svg",
            chart(
                "All streams of the scenario's load: tokens per second",
                "tok/s",
                &|r| r.loaded.as_ref().map(|s| s.summary.throughput_tok_s),
            ),
        ),
        (
            "projection-ttft.svg",
            chart("One stream: time to first token", "seconds", &|r| {
                r.single.as_ref().map(|s| s.summary.ttft_ms.mean / 1e3)
            }),
        ),
    ];
    for (name, bars) in charts {
        let path = dir.join(name);
        std::fs::write(&path, bar_chart(&bars)).with_context(|| path.display().to_string())?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

fn print_table(rows: &[Projection]) {
    println!("| office | model | stages | one stream tok/s | ms/token | TTFT s | network share | loaded tok/s (bottleneck) |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        match &r.single {
            Some(s) => println!(
                "| {} | {} | {} | {:.1} | {:.0} | {:.2} | {:.0}% | {} |",
                r.office,
                r.model,
                s.stages.len(),
                1e3 / s.summary.token_ms.mean.max(1e-9),
                s.summary.token_ms.mean,
                s.summary.ttft_ms.mean / 1e3,
                r.network_share.unwrap_or(0.0) * 100.0,
                r.loaded
                    .as_ref()
                    .map(|l| format!("{:.1} ({})", l.summary.throughput_tok_s, l.bottleneck))
                    .unwrap_or_else(|| "—".into())
            ),
            None => println!(
                "| {} | {} | — | does not fit | | | | {} |",
                r.office,
                r.model,
                r.why_not.as_deref().unwrap_or("")
            ),
        }
    }
}
