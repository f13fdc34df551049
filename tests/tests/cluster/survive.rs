//! The office: stages killed, frozen and stopped mid-answer cost the
//! answer nothing — the origin replays the request on the next plan.

use crate::prelude::*;

/// A 300-token answer, greedy and seeded.
const LONG: [&[&str]; 2] = [
    &["--no-template", "--temp", "0", "-n", "300"],
    &["--no-template", "--temp", "0.8", "--seed", "7", "-n", "300"],
];
const STORY: &str = "Once upon a time, in a small village by the sea,";

/// A cluster of three on loopback (any two hold the model) and which of
/// them to ask and which stage to hurt (never the asked one).
fn three(dir: &Path, model: &Path) -> (Vec<NodeProc>, usize, usize) {
    let mut nodes = loopback_cluster(dir, model, 3, "80M", &[]);
    let (asked, victim) = pick(&mut nodes);
    (nodes, asked, victim)
}

/// Waits for a plan over all of `nodes` with two stages or more; the
/// first stage is asked, the second hurt.
pub(crate) fn pick(nodes: &mut [NodeProc]) -> (usize, usize) {
    let n = nodes.len();
    let s = wait_plan_with(&mut nodes[0], n, |stages| stages >= 2);
    let staged: Vec<String> = s["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| !n["layers"].is_null())
        .map(|n| n["http"].as_str().unwrap().to_string())
        .collect();
    let find = |http: &str| nodes.iter().position(|n| n.http.ends_with(http)).unwrap();
    (find(&staged[0]), find(&staged[1]))
}

fn signal(node: &NodeProc, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &node.pid().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig}");
}

/// A pseudo-random delay in 0..max_ms, different per trial.
pub(crate) fn moment(trial: u64, max_ms: u64) -> Duration {
    let x = (trial.wrapping_add(1)).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 33;
    Duration::from_millis(x % max_ms)
}

#[test]
fn a_stage_killed_mid_answer_costs_the_answer_nothing() {
    let _serial = serial();
    let model = default_model();
    let m = model.display().to_string();
    let dir = tempfile::tempdir().unwrap();
    let (mut nodes, mut asked, mut victim) = three(dir.path(), &model);
    let key = dir.path().join("key").display().to_string();
    let want: Vec<String> = LONG.iter().map(|a| run_single(&model, a, STORY)).collect();
    // Two trials per setting, each killing at another moment of the answer.
    for trial in 0..4u64 {
        let _logs = LogsOnFailure::of(&nodes.iter().collect::<Vec<_>>());
        let args = LONG[trial as usize % 2];
        let replays = replays_of(&nodes[asked]);
        let streaming = Streaming::start(&nodes[asked], args, STORY);
        std::thread::sleep(moment(trial, 1500));
        nodes[victim].kill();
        let head = String::from_utf8_lossy(&streaming.head).into_owned();
        let (rest, err, ok) = streaming.finish();
        assert!(ok, "trial {trial}: {err}");
        assert_eq!(head + &rest, want[trial as usize % 2], "trial {trial}");
        assert!(
            replays_of(&nodes[asked]) > replays,
            "trial {trial}: no replay"
        );
        // A fresh node takes the dead one's place for the next trial.
        let addr = nodes[asked].addr_on("127.0.0.1");
        let extra = ["--max-memory", "80M", "--peer", &addr];
        nodes[victim] = loopback_node(dir.path(), &m, &key, &extra);
        (asked, victim) = pick(&mut nodes);
    }
}

/// The replays a node counted (`/metrics`).
pub(crate) fn replays_of(node: &NodeProc) -> u64 {
    node.metric("shoal_replays_total").unwrap_or(0.0) as u64
}

#[test]
fn a_frozen_stage_is_out_in_seconds_and_back_after_it_wakes() {
    let _serial = serial();
    let model = default_model();
    let dir = tempfile::tempdir().unwrap();
    let (mut nodes, asked, victim) = three(dir.path(), &model);
    let _logs = LogsOnFailure::of(&nodes.iter().collect::<Vec<_>>());
    let want = run_single(&model, LONG[0], STORY);
    let streaming = Streaming::start(&nodes[asked], LONG[0], STORY);
    signal(&nodes[victim], "-STOP");
    let frozen_at = Instant::now();
    let out = nodes[asked].wait_status(secs(10), |s| plan_size(s).0 == 2 && !s["plan"].is_null());
    let took = frozen_at.elapsed();
    let head = String::from_utf8_lossy(&streaming.head).into_owned();
    let (rest, err, ok) = streaming.finish();
    signal(&nodes[victim], "-CONT");
    let woke_at = Instant::now();
    assert!(ok, "{err}");
    assert_eq!(head + &rest, want);
    assert!(
        took < secs(5),
        "frozen stage out of the plan after {took:?}: {out:#}"
    );
    let whole = |s: &Value| plan_size(s).0 == 3 && !s["plan"].is_null();
    nodes[asked].wait_status(secs(10), whole);
    nodes[victim].wait_status(secs(10), whole);
    let back = woke_at.elapsed();
    assert!(back < secs(10), "back after {back:?}");
    // The woken node serves again, as one machine would.
    let (got, err, ok) = nodes[victim].ask(SETTINGS[0], PROMPTS[0]);
    assert!(ok, "{err}");
    assert_eq!(got, run_single(&model, SETTINGS[0], PROMPTS[0]));
}

#[test]
fn a_stage_stopped_with_sigterm_says_goodbye_and_the_answer_goes_on() {
    let _serial = serial();
    let model = default_model();
    let dir = tempfile::tempdir().unwrap();
    let (mut nodes, asked, victim) = three(dir.path(), &model);
    let _logs = LogsOnFailure::of(&nodes.iter().collect::<Vec<_>>());
    let want = run_single(&model, LONG[1], STORY);
    let streaming = Streaming::start(&nodes[asked], LONG[1], STORY);
    signal(&nodes[victim], "-TERM");
    let stopped_at = Instant::now();
    let exited = nodes[victim].wait_exit(secs(15));
    let took = stopped_at.elapsed();
    let head = String::from_utf8_lossy(&streaming.head).into_owned();
    let (rest, err, ok) = streaming.finish();
    assert!(ok, "{err}");
    assert_eq!(head + &rest, want);
    assert!(exited && took < secs(10), "exited: {exited} after {took:?}");
    let metrics = nodes[asked].get("/metrics");
    assert!(metrics.contains("shoal_members_left_total 1"), "{metrics}");
}

#[test]
fn forty_seconds_of_chaos_change_no_answer_and_hang_none() {
    let _serial = serial();
    let available = shoal_tests::lan::Lan::available();
    if !prerequisite("network namespaces (root and iproute2)", available) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("chaos.json");
    // The bench's own script, shorter: 4 nodes in namespaces, kills,
    // freezes, SIGTERMs and cut cables on nodes 1-3 while 4 streams run.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/chaos.py");
    let out = std::process::Command::new("python3")
        .arg(script)
        .args(["--shoal", &shoal_tests::shoal_bin().display().to_string()])
        .args(["--model", &default_model().display().to_string()])
        .args([
            "--seconds",
            "40",
            "--streams",
            "4",
            "--tokens",
            "48",
            "--seed",
            "2",
        ])
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap_or_default())
        .unwrap_or_else(|e| panic!("no result ({e}): {said}"));
    assert_eq!(r["different"], 0, "{said}");
    assert_eq!(r["hung"], 0, "{said}");
    assert_eq!(r["failed"], 0, "{said}");
    assert!(r["identical"].as_u64() > Some(10), "{said}");
    let disturbed: u64 = r["disturbances"]
        .as_object()
        .unwrap()
        .values()
        .filter_map(Value::as_u64)
        .sum();
    assert!(disturbed >= 3, "{said}");
    println!("{said}");
}
