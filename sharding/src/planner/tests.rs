use proptest::prelude::*;

use super::*;

const MIB: u64 = 1 << 20;

fn model(layers: usize, layer_mib: u64) -> ModelSpec {
    ModelSpec {
        layer_bytes: vec![layer_mib * MIB; layers],
        first_bytes: 4 * MIB,
        last_bytes: 8 * MIB,
        last_compute_bytes: 8 * MIB,
        kv_bytes_per_token_layer: 1024,
        context_tokens: 1024,
        activation_bytes: 4096,
    }
}

fn node(id: &str, us_per_mib: f64, memory_mib: u64) -> NodeSpec {
    NodeSpec::flat(id, us_per_mib, memory_mib * MIB)
}

fn uniform_links(n: usize, link: LinkSpec) -> Vec<Vec<LinkSpec>> {
    vec![vec![link; n]; n]
}

fn input(model: ModelSpec, nodes: Vec<NodeSpec>) -> PlanInput {
    let links = uniform_links(nodes.len(), LinkSpec::LOCAL);
    PlanInput {
        model,
        nodes,
        links,
        goal: PlanGoal::Latency,
    }
}

fn ranges(p: &Plan) -> Vec<(String, Range<usize>)> {
    p.stages
        .iter()
        .map(|s| (s.node_id.clone(), s.layers.clone()))
        .collect()
}

#[test]
fn one_node_that_fits_takes_everything() {
    let p = plan(&input(model(30, 3), vec![node("a", 100.0, 1000)])).unwrap();
    assert_eq!(ranges(&p), vec![("a".into(), 0..30)]);
}

#[test]
fn equal_nodes_with_room_use_one_stage_for_latency() {
    let nodes = vec![node("b", 100.0, 1000), node("a", 100.0, 1000)];
    let p = plan(&input(model(30, 3), nodes)).unwrap();
    assert_eq!(p.stages.len(), 1, "a second stage only adds a hop: {p}");
    assert_eq!(p.stages[0].node_id, "a", "ties break on the id");
}

#[test]
fn memory_caps_force_a_split_and_are_respected() {
    let m = model(30, 3);
    let nodes = vec![
        node("a", 100.0, 50),
        node("b", 100.0, 50),
        node("c", 100.0, 50),
    ];
    let p = plan(&input(m.clone(), nodes)).unwrap();
    assert_eq!(p.stages.len(), 3, "{p}");
    let mut next = 0;
    for s in &p.stages {
        assert_eq!(s.layers.start, next);
        next = s.layers.end;
        assert!(s.memory_bytes <= 50 * MIB);
        assert_eq!(s.memory_bytes, m.stage_memory(s.layers.clone()));
    }
    assert_eq!(next, 30);
}

#[test]
fn a_slow_node_is_left_out() {
    let nodes = vec![
        node("fast1", 100.0, 70),
        node("fast2", 100.0, 70),
        node("slow", 5000.0, 1000),
    ];
    let p = plan(&input(model(30, 3), nodes)).unwrap();
    let used: Vec<&str> = p.stages.iter().map(|s| s.node_id.as_str()).collect();
    assert!(!used.contains(&"slow"), "{p}");
}

#[test]
fn the_faster_node_gets_more_layers() {
    let nodes = vec![node("fast", 100.0, 100), node("slow", 300.0, 100)];
    let p = plan(&input(model(30, 3), nodes)).unwrap();
    let fast = p.stages.iter().find(|s| s.node_id == "fast").unwrap();
    assert!(fast.layers.len() > 15, "{p}");
}

#[test]
fn too_little_memory_says_how_much_is_missing() {
    let m = model(30, 3);
    let nodes = vec![node("a", 100.0, 20), node("b", 100.0, 20)];
    let err = plan(&input(m.clone(), nodes)).unwrap_err();
    let PlanError::DoesNotFit {
        needed_bytes,
        available_bytes,
    } = err.clone()
    else {
        panic!("{err}");
    };
    assert_eq!(needed_bytes, m.total_memory());
    assert_eq!(available_bytes, 40 * MIB);
    let text = err.to_string();
    assert!(text.contains("MiB missing"), "{text}");
}

#[test]
fn throughput_goal_spreads_layers_evenly() {
    let mut i = input(
        model(30, 3),
        vec![node("a", 100.0, 1000), node("b", 100.0, 1000)],
    );
    i.goal = PlanGoal::Throughput;
    let p = plan(&i).unwrap();
    assert_eq!(p.stages.len(), 2, "{p}");
    let lens: Vec<usize> = p.stages.iter().map(|s| s.layers.len()).collect();
    // The last stage also streams the head, so it takes fewer layers.
    assert!(lens[0] >= lens[1] && lens[0] - lens[1] <= 4, "{lens:?}");
}

#[test]
fn a_slow_link_is_avoided() {
    // Three nodes, each holding half the model; the link between a and b is slow.
    let nodes = vec![
        node("a", 100.0, 70),
        node("b", 100.0, 70),
        node("c", 100.0, 70),
    ];
    let mut links = uniform_links(3, LinkSpec::LOCAL);
    let slow = LinkSpec {
        latency_us: 20_000.0,
        bytes_per_second: 1e6,
    };
    links[0][1] = slow;
    links[1][0] = slow;
    let p = plan(&PlanInput {
        model: model(30, 3),
        nodes,
        links,
        goal: PlanGoal::Latency,
    })
    .unwrap();
    let used: Vec<&str> = p.stages.iter().map(|s| s.node_id.as_str()).collect();
    assert_eq!(used.len(), 2);
    assert!(used.contains(&"c"), "{p}");
}

#[test]
fn display_is_one_line() {
    let p = plan(&input(model(30, 3), vec![node("node-abc", 100.0, 1000)])).unwrap();
    let s = p.to_string();
    assert!(!s.contains('\n'));
    assert!(s.contains("[0..30)"), "{s}");
}

/// Every assignment of contiguous ranges to every ordered selection of nodes.
fn brute_force(i: &PlanInput) -> Option<f64> {
    fn orders(n: usize, cur: &mut Vec<usize>, out: &mut Vec<Vec<usize>>) {
        if !cur.is_empty() {
            out.push(cur.clone());
        }
        for k in 0..n {
            if !cur.contains(&k) {
                cur.push(k);
                orders(n, cur, out);
                cur.pop();
            }
        }
    }
    fn cuts(n: usize, k: usize) -> Vec<Vec<usize>> {
        if k == 1 {
            return vec![vec![0, n]];
        }
        let mut out = Vec::new();
        for first in 1..n {
            for rest in cuts(n - first, k - 1) {
                let mut c = vec![0, first];
                c.extend(rest.iter().skip(1).map(|x| x + first));
                out.push(c);
            }
        }
        out
    }
    let m = &i.model;
    let n = m.layer_bytes.len();
    let mut all = Vec::new();
    orders(i.nodes.len(), &mut Vec::new(), &mut all);
    let mut best: Option<f64> = None;
    for order in all {
        let k = order.len();
        if k > n {
            continue;
        }
        'cut: for c in cuts(n, k) {
            let mut cost = 0.0;
            for s in 0..k {
                let node = &i.nodes[order[s]];
                let layers = c[s]..c[s + 1];
                if m.stage_memory(layers.clone()) > node.memory_bytes {
                    continue 'cut;
                }
                cost += node.us_per_mib * mib(m.streamed_bytes(layers));
                if k > 1 {
                    let bytes = if s + 1 == k { 4 } else { m.activation_bytes };
                    cost += i.links[order[s]][order[(s + 1) % k]].send_us(bytes);
                }
            }
            if best.is_none_or(|b| cost < b) {
                best = Some(cost);
            }
        }
    }
    best
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The planner finds the brute-force optimum on small clusters, links
    /// of any latency included (20 ms ones among them).
    #[test]
    fn matches_brute_force(
        layers in 2usize..7,
        speeds in prop::collection::vec(50.0f64..500.0, 1..4),
        mems in prop::collection::vec(5u64..40, 3),
        lat in prop::collection::vec(prop::sample::select(vec![50.0, 1000.0, 20_000.0]), 9),
    ) {
        let m = ModelSpec {
            layer_bytes: vec![3 * MIB; layers],
            first_bytes: MIB,
            last_bytes: 2 * MIB,
            last_compute_bytes: 2 * MIB,
            kv_bytes_per_token_layer: 512,
            context_tokens: 256,
            activation_bytes: 2048,
        };
        let n = speeds.len();
        let nodes: Vec<NodeSpec> = (0..n)
            .map(|k| node(&format!("n{k}"), speeds[k], mems[k]))
            .collect();
        let links = (0..n)
            .map(|a| (0..n).map(|b| LinkSpec { latency_us: lat[a * 3 + b], bytes_per_second: 1e8 }).collect())
            .collect();
        let i = PlanInput { model: m, nodes, links, goal: PlanGoal::Latency };
        match (plan(&i), brute_force(&i)) {
            (Ok(p), Some(b)) => prop_assert!((p.token_latency_us - b).abs() < 1e-6 * b, "{} vs {b}", p.token_latency_us),
            (Err(PlanError::DoesNotFit { .. }), None) => {}
            (p, b) => prop_assert!(false, "planner {p:?}, brute force {b:?}"),
        }
    }

    /// Listing the nodes in another order gives the same plan.
    #[test]
    fn independent_of_node_order(seed in 0u64..1000) {
        let mut nodes = vec![node("a", 100.0, 50), node("b", 150.0, 50), node("c", 100.0, 50), node("d", 120.0, 50)];
        let first = plan(&input(model(30, 3), nodes.clone())).unwrap();
        let k = (seed % 4) as usize;
        nodes.rotate_left(k);
        if seed % 2 == 0 { nodes.reverse(); }
        prop_assert_eq!(plan(&input(model(30, 3), nodes)).unwrap(), first);
    }
}
