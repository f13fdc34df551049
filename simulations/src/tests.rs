use std::ops::Range;

use proptest::prelude::*;
use sharding::{LinkSpec, ModelSpec, NodeSpec, PlanGoal};

use crate::{simulate, Cluster, Link, Load, Scenario};

const MIB: u64 = 1 << 20;

fn model(layers: usize, layer_mib: u64) -> ModelSpec {
    ModelSpec {
        layer_bytes: vec![layer_mib * MIB; layers],
        first_bytes: 2 * MIB,
        last_bytes: 3 * MIB,
        last_compute_bytes: 3 * MIB,
        kv_bytes_per_token_layer: 1024,
        context_tokens: 256,
        activation_bytes: 4096,
    }
}

fn link(latency_ms: f64, mbit: f64) -> Link {
    Link {
        spec: LinkSpec {
            latency_us: latency_ms * 1e3,
            bytes_per_second: mbit * 1e6 / 8.0,
        },
        jitter_us: 0.0,
    }
}

fn one_stream(tokens: usize) -> Load {
    Load {
        streams: Some(1),
        rate_per_s: None,
        requests: 1,
        prompt_tokens: 1,
        prompt_tokens_max: None,
        output_tokens: tokens,
        seed: 0,
        acceptance: None,
    }
}

fn cluster(model: ModelSpec, nodes: Vec<NodeSpec>, links: Vec<Vec<Link>>) -> Cluster {
    Cluster {
        model,
        nodes,
        links,
        goal: PlanGoal::Latency,
        split: None,
        entry: None,
        hosts: Vec::new(),
    }
}

/// Every ordered choice of nodes and every cut of the layers among them.
fn all_splits(nodes: usize, layers: usize) -> Vec<Vec<(usize, Range<usize>)>> {
    fn orders(n: usize, cur: &mut Vec<usize>, out: &mut Vec<Vec<usize>>) {
        if !cur.is_empty() {
            out.push(cur.clone());
        }
        for i in 0..n {
            if !cur.contains(&i) {
                cur.push(i);
                orders(n, cur, out);
                cur.pop();
            }
        }
    }
    fn cuts(
        k: usize,
        start: usize,
        layers: usize,
        cur: &mut Vec<usize>,
        out: &mut Vec<Vec<usize>>,
    ) {
        if k == 1 {
            let mut c = cur.clone();
            c.push(layers);
            out.push(c);
            return;
        }
        for end in start + 1..=layers - (k - 1) {
            cur.push(end);
            cuts(k - 1, end, layers, cur, out);
            cur.pop();
        }
    }
    let mut ords = Vec::new();
    orders(nodes, &mut Vec::new(), &mut ords);
    let mut out = Vec::new();
    for order in ords.into_iter().filter(|o| o.len() <= layers) {
        let mut ends = Vec::new();
        cuts(order.len(), 0, layers, &mut Vec::new(), &mut ends);
        for e in ends {
            let mut start = 0;
            out.push(
                order
                    .iter()
                    .zip(e)
                    .map(|(&n, end)| {
                        let r = start..end;
                        start = end;
                        (n, r)
                    })
                    .collect(),
            );
        }
    }
    out
}

fn fits(c: &Cluster, split: &[(usize, Range<usize>)]) -> bool {
    split
        .iter()
        .all(|(n, l)| c.model.stage_memory(l.clone()) <= c.nodes[*n].memory_bytes)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// The planner's split is the one a brute-force search over every
    /// split finds fastest in the simulator, with 20 ms links among them.
    #[test]
    fn planner_picks_the_simulators_best_split(
        layers in 2usize..7,
        speeds in prop::collection::vec(20.0f64..400.0, 3),
        memory in prop::collection::vec(8u64..40, 3),
        slow in prop::collection::vec(any::<bool>(), 3),
        mbit in prop::sample::select(vec![100.0, 1000.0, 10000.0]),
    ) {
        let nodes: Vec<NodeSpec> = (0..3)
            .map(|i| NodeSpec::flat(format!("n{i}"), speeds[i], memory[i] * MIB))
            .collect();
        // Pair (i, i+1 mod 3) is 20 ms apart when `slow[i]`, else a LAN.
        let mut links = vec![vec![link(0.2, mbit); 3]; 3];
        for i in 0..3 {
            let j = (i + 1) % 3;
            if slow[i] {
                links[i][j] = link(20.0, mbit);
                links[j][i] = link(20.0, mbit);
            }
        }
        let mut c = cluster(model(layers, 4), nodes, links);
        let load = one_stream(6);
        let planned = simulate(&c, &load);
        let mut best: Option<f64> = None;
        for split in all_splits(3, layers) {
            if !fits(&c, &split) {
                continue;
            }
            c.split = Some(split);
            let ms = simulate(&c, &load).unwrap().summary.token_ms.mean;
            best = Some(best.map_or(ms, |b: f64| b.min(ms)));
        }
        match (planned, best) {
            (Ok(r), Some(b)) => prop_assert!(
                r.summary.token_ms.mean <= b * (1.0 + 1e-9) + 1e-6,
                "planner {} ms ({}) vs best {} ms", r.summary.token_ms.mean, r.plan, b
            ),
            (Err(_), None) => {}
            (p, b) => prop_assert!(false, "planner {:?} but brute force {:?}", p.map(|r| r.plan), b),
        }
    }
}

#[test]
fn one_stream_runs_at_the_planners_latency() {
    let nodes = vec![
        NodeSpec::flat("a", 100.0, 64 * MIB),
        NodeSpec::flat("b", 150.0, 64 * MIB),
    ];
    let mut c = cluster(model(8, 4), nodes, vec![vec![link(1.0, 1000.0); 2]; 2]);
    c.split = Some(vec![(0, 0..5), (1, 5..8)]);
    let r = simulate(&c, &one_stream(20)).unwrap();
    assert!(
        (r.summary.token_ms.mean - r.planned_token_ms).abs() < 1e-3,
        "{} vs {}",
        r.summary.token_ms.mean,
        r.planned_token_ms
    );
    assert_eq!(r.summary.tokens, 20);
    assert_eq!(r.stages.len(), 2);
}

#[test]
fn batching_raises_throughput_as_the_cost_model_says() {
    let mut n = NodeSpec::flat("a", 100.0, 64 * MIB);
    n.row_us_per_mib = 20.0;
    let c = cluster(model(8, 4), vec![n.clone()], vec![vec![link(0.05, 1000.0)]]);
    let mut load = one_stream(64);
    let one = simulate(&c, &load).unwrap();
    load.streams = Some(4);
    load.requests = 4;
    let four = simulate(&c, &load).unwrap();
    // 4 decode rows per pass: 32 MiB layers + 3 MiB head, each pass_us(·, 4).
    let pass = n.pass_us(32.0, 4) + n.pass_us(3.0, 4);
    let ideal = 4.0 * 1e6 / pass;
    eprintln!("{four}");
    assert!(four.summary.throughput_tok_s > 2.0 * one.summary.throughput_tok_s);
    assert!(
        (four.summary.throughput_tok_s - ideal).abs() / ideal < 0.05,
        "{} vs {ideal}",
        four.summary.throughput_tok_s
    );
    assert!((four.stages[0].sequences_per_pass - 4.0).abs() < 0.2);
}

#[test]
fn pipeline_keeps_one_micro_batch_per_stage() {
    let nodes = vec![
        NodeSpec::flat("a", 100.0, 64 * MIB),
        NodeSpec::flat("b", 100.0, 64 * MIB),
    ];
    let mut c = cluster(model(8, 4), nodes, vec![vec![link(0.05, 10000.0); 2]; 2]);
    c.split = Some(vec![(0, 0..4), (1, 4..8)]);
    let mut load = one_stream(48);
    load.streams = Some(4);
    load.requests = 4;
    let r = simulate(&c, &load).unwrap();
    assert!((r.stages[0].sequences_per_pass - 2.0).abs() < 0.3, "{r}");
    assert!(r.stages.iter().all(|s| s.utilisation > 0.6), "{r}");
}

#[test]
fn jitter_and_arrivals_are_deterministic_per_seed() {
    let nodes = vec![
        NodeSpec::flat("a", 100.0, 64 * MIB),
        NodeSpec::flat("b", 100.0, 64 * MIB),
    ];
    let mut links = vec![vec![link(2.0, 1000.0); 2]; 2];
    links[0][1].jitter_us = 500.0;
    links[1][0].jitter_us = 500.0;
    let mut c = cluster(model(8, 4), nodes, links);
    c.split = Some(vec![(0, 0..4), (1, 4..8)]);
    let load = Load {
        streams: None,
        rate_per_s: Some(20.0),
        requests: 30,
        prompt_tokens: 16,
        prompt_tokens_max: Some(200),
        output_tokens: 16,
        seed: 7,
        acceptance: None,
    };
    let a = simulate(&c, &load).unwrap();
    assert_eq!(a, simulate(&c, &load).unwrap());
    let b = simulate(
        &c,
        &Load {
            seed: 8,
            ..load.clone()
        },
    )
    .unwrap();
    assert_ne!(a.summary.ttft_ms, b.summary.ttft_ms);
    assert_eq!(a.summary.requests, 30);
    assert_eq!(a.summary.tokens, 30 * 16);
}

#[test]
fn bundled_scenarios_resolve_and_run() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let (s, dir) = Scenario::load(&path).unwrap();
        let (cluster, load) = s
            .resolve(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        match simulate(&cluster, &load) {
            Ok(r) => assert!(r.summary.tokens > 0, "{}", path.display()),
            // A projection may show a model that does not fit.
            Err(crate::SimError::Plan(_)) => {}
            Err(e) => panic!("{}: {e}", path.display()),
        }
        seen += 1;
    }
    assert!(seen >= 3, "scenarios found: {seen}");
}

#[test]
fn bad_scenarios_say_what_is_wrong() {
    let base = r#"
        [model]
        shape = "llama-3-8b"
        [[nodes]]
        name = "a"
        memory_gib = 16
        bandwidth_gb_s = 50
        [load]
        streams = 1
        prompt_tokens = 8
        output_tokens = 8
    "#;
    let ok = Scenario::from_toml(base).unwrap();
    assert!(ok.resolve(std::path::Path::new(".")).is_ok());
    let cases = [
        (base.replace("llama-3-8b", "llama-9"), "one of"),
        (base.replace("bandwidth_gb_s = 50", ""), "us_per_mib"),
        (
            base.replace("memory_gib = 16", "memory_gib = 16\nspeed = 3"),
            "unknown field",
        ),
        (
            base.replace("streams = 1", "streams = 1\nrate_per_s = 2.0"),
            "not both",
        ),
        (
            base.replace("output_tokens = 8", "output_tokens = 9000"),
            "past the model's context",
        ),
    ];
    for (text, want) in cases {
        let err = match Scenario::from_toml(&text) {
            Err(e) => e.to_string(),
            Ok(s) => match s.resolve(std::path::Path::new(".")) {
                Err(e) => e.to_string(),
                Ok((c, l)) => simulate(&c, &l)
                    .map(|_| String::new())
                    .unwrap_or_else(|e| e.to_string()),
            },
        };
        assert!(err.contains(want), "{err:?} should mention {want:?}");
    }
}

#[test]
fn nodes_sharing_a_machine_share_its_cores() {
    let nodes: Vec<NodeSpec> = (0..3)
        .map(|i| NodeSpec::flat(format!("n{i}"), 100.0, 64 * MIB))
        .collect();
    let mut c = cluster(model(9, 4), nodes, vec![vec![link(0.05, 10000.0); 3]; 3]);
    c.split = Some(vec![(0, 0..3), (1, 3..6), (2, 6..9)]);
    let mut load = one_stream(48);
    load.streams = Some(6);
    load.requests = 6;
    let own = simulate(&c, &load).unwrap();
    c.hosts = vec![crate::sim::Host {
        cores: 2.0,
        nodes: vec![(0, 1.0), (1, 1.0), (2, 1.0)],
    }];
    let shared = simulate(&c, &load).unwrap();
    // Three busy stages on two cores: at most 2/3 of the throughput.
    assert!(
        shared.summary.throughput_tok_s < own.summary.throughput_tok_s * 0.8,
        "{} vs {}",
        shared.summary.throughput_tok_s,
        own.summary.throughput_tok_s
    );
    // One stream never has two stages busy at once: no difference.
    let one = one_stream(16);
    let a = simulate(&c, &one).unwrap();
    c.hosts.clear();
    let b = simulate(&c, &one).unwrap();
    assert!((a.summary.token_ms.mean - b.summary.token_ms.mean).abs() < 1e-6);
}

/// Speculation in the simulator: on a pipeline whose hops cost more than
/// an extra row, accepted proposals shorten the trips; where nothing is
/// accepted it switches itself off and costs (almost) nothing.
#[test]
fn speculation_pays_where_rows_are_cheap_and_turns_itself_off() {
    let cheap_rows = |name: &str| NodeSpec {
        row_us_per_mib: 5.0,
        prompt_row_us_per_mib: 5.0,
        ..NodeSpec::flat(name, 100.0, 64 * MIB)
    };
    let mut c = cluster(
        model(8, 4),
        vec![cheap_rows("a"), cheap_rows("b")],
        vec![vec![link(5.0, 1000.0); 2]; 2],
    );
    c.split = Some(vec![(0, 0..4), (1, 4..8)]);
    let rate = |c: &Cluster, acceptance: Option<f64>| {
        let load = Load {
            acceptance,
            ..one_stream(200)
        };
        simulate(c, &load).unwrap().summary.throughput_tok_s
    };
    let plain = rate(&c, None);
    let copy = rate(&c, Some(0.8));
    let none = rate(&c, Some(0.0));
    assert!(copy > 2.0 * plain, "{copy:.1} vs {plain:.1} tok/s");
    assert!(none > 0.95 * plain, "{none:.1} vs {plain:.1} tok/s");
    // Rows as dear as a step (a compute-bound machine): off, at no loss.
    c.nodes = vec![
        NodeSpec::flat("a", 100.0, 64 * MIB),
        NodeSpec::flat("b", 100.0, 64 * MIB),
    ];
    c.links = vec![vec![link(0.05, 10_000.0); 2]; 2];
    let plain = rate(&c, None);
    let dear = rate(&c, Some(0.8));
    assert!(dear > 0.95 * plain, "{dear:.1} vs {plain:.1} tok/s");
}
