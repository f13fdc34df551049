//! Speculative decoding through a pipeline: proposals verified in one trip
//! through every stage (and more sent while earlier ones are in flight),
//! rejected ones dropped from every stage's cache; the answers are those
//! of one machine without speculation.

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
    // A request may opt out: same answer, nothing proposed for it.
    let before = speculation_counts(&nodes[0]);
    let greedy = ["--temp", "0", "-n", "48"];
    let (got, err, ok) = nodes[0].ask(&[&greedy[..], &["--no-speculate"]].concat(), CODE);
    assert!(ok, "{err}");
    assert_eq!(got, run_single(&model, &greedy, CODE));
    assert_eq!(speculation_counts(&nodes[0]), before, "it speculated");
    // Always 8 proposals, on the poem too (which an adaptive length would
    // mostly not speculate on): a share stands, not most.
    let (proposed, accepted) = speculation_counts(&nodes[0]);
    assert!(
        accepted >= 20 && accepted * 6 > proposed,
        "{accepted}/{proposed} accepted"
    );
}

/// Proposals in flight (a chunk of proposals sent before the one before it
/// was verified) inside batches, beside a request with a grammar (which
/// does not speculate), and through a replay after a stage dies: every
/// answer is one machine's.
#[test]
fn speculation_in_batches_and_through_a_replay_gives_one_machines_tokens() {
    use crate::survive::{moment, pick, replays_of};
    let _serial = serial();
    let model = default_model();
    let dir = tempfile::tempdir().unwrap();
    // Two proposals a chunk, always: many chunks in flight, many voided.
    let spec = ["--speculate", "2"];
    let mut nodes = loopback_cluster(dir.path(), &model, 3, "80M", &spec);
    let (asked, victim) = pick(&mut nodes);
    let _logs = LogsOnFailure::of(&nodes.iter().collect::<Vec<_>>());
    let greedy = ["--temp", "0", "-n", "48"];
    let seeded = ["--temp", "0.8", "--seed", "5", "-n", "48"];
    let json = ["--temp", "0", "-n", "48", "--format", "json"];
    let asks: [(&[&str], &str); 4] = [
        (&greedy, CODE),
        (&seeded, CODE),
        (
            &greedy,
            "Fix the spelling and return the text whole: the quick brwon fox jumpd.",
        ),
        (&json, "Give a JSON object with a name and an age."),
    ];
    let want: Vec<String> = asks.iter().map(|(a, p)| run_single(&model, a, p)).collect();
    let at_once: Vec<(&NodeProc, &[&str], &str)> =
        asks.iter().map(|&(a, p)| (&nodes[asked], a, p)).collect();
    for round in 0..2 {
        let got = ask_together(&at_once);
        assert_eq!(got, want, "round {round}");
    }
    // A stage dies while proposals are in flight: the replay goes on from
    // the tokens that stood, and the answer is the same.
    let copy = ["--no-template", "--temp", "0", "-n", "200"];
    let text = CODE.repeat(3);
    let want = run_single(&model, &copy, &text);
    let replays = replays_of(&nodes[asked]);
    let streaming = Streaming::start(&nodes[asked], &copy, &text);
    std::thread::sleep(moment(1, 800));
    nodes[victim].kill();
    let head = String::from_utf8_lossy(&streaming.head).into_owned();
    let (rest, err, ok) = streaming.finish();
    assert!(ok, "{err}");
    assert_eq!(head + &rest, want);
    assert!(replays_of(&nodes[asked]) > replays, "no replay");
    let (proposed, accepted) = speculation_counts(&nodes[asked]);
    assert!(accepted >= 20, "{accepted}/{proposed} accepted");
}

/// Proposals sent and accepted by the requests `node` originated.
fn speculation_counts(node: &NodeProc) -> (u64, u64) {
    let count = |name: &str| node.metric(name).unwrap_or(0.0) as u64;
    (
        count("shoal_speculation_proposed_total"),
        count("shoal_speculation_accepted_total"),
    )
}
