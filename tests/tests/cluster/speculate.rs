//! Speculative decoding through a pipeline: proposals verified in one trip
//! through every stage, rejected ones dropped from every stage's cache;
//! the answers are those of one machine without speculation.

use crate::prelude::*;

const CODE: &str = "Rewrite this Python code with the same functions but add a docstring to \
                    each function:\n\ndef add(a, b):\n    return a + b\n\ndef sub(a, b):\n    \
                    return a - b\n\ndef mul(a, b):\n    return a * b\n";

#[test]
fn speculation_through_two_nodes_gives_one_machines_tokens() {
    let _serial = serial();
    let model = default_model();
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = loopback_cluster(dir.path(), &model, 2, "80M", &["--speculate", "8"]);
    wait_plan(&mut nodes[0], 2, 2);
    // A prompt longer than one pass of the batcher (256 rows): the last stage's
    // sampler keeps all of it (penalties and draw positions depend on it).
    let long = format!("{}\nNow the same again, please.", CODE.repeat(6));
    for prompt in [CODE, "Write a short poem about the sea.", long.as_str()] {
        for settings in [
            &["--temp", "0", "-n", "64"][..],
            &[
                "--temp",
                "0.8",
                "--seed",
                "3",
                "--repeat-penalty",
                "1.3",
                "-n",
                "64",
            ][..],
        ] {
            let want = run_single(&model, settings, prompt);
            let (got, err, ok) = nodes[0].ask(settings, prompt);
            assert!(ok, "{err}");
            assert_eq!(got, want, "{settings:?} {prompt}");
        }
    }
    let metrics = nodes[0].try_get("/metrics").unwrap();
    let count = |name: &str| -> u64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0) as u64
    };
    let (proposed, accepted) = (
        count("shoal_speculation_proposed_total"),
        count("shoal_speculation_accepted_total"),
    );
    assert!(
        accepted >= 20 && accepted * 4 > proposed,
        "{accepted}/{proposed} accepted"
    );
}
