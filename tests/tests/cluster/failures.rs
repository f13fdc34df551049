//! What a cluster refuses or survives: a model too big, a wrong key, a
//! stage killed mid-answer, nodes holding different models.

use crate::prelude::*;

#[test]
fn a_model_no_node_can_hold_is_refused_with_how_much_is_missing() {
    let _serial = serial();
    let model = default_model();
    let dir = tempfile::tempdir().unwrap();
    let mut one = loopback_cluster(dir.path(), &model, 1, "60M", &[]);
    let s = one[0].wait_status(secs(10), |s| s["plan_error"].is_string());
    let e = s["plan_error"].as_str().unwrap();
    assert!(e.contains("MiB missing"), "{e}");
    let (_, err, ok) = one[0].ask(&["-n", "4"], "hello");
    assert!(!ok);
    assert!(err.contains("cannot serve this model"), "{err}");
}

#[test]
fn a_node_with_the_wrong_key_is_refused() {
    let _serial = serial();
    let model = default_model();
    let dir = tempfile::tempdir().unwrap();
    let mut a = loopback_cluster(dir.path(), &model, 1, "1G", &[]).remove(0);
    let wrong = keyfile(dir.path(), "wrong");
    let m = model.display().to_string();
    let peer = a.addr_on("127.0.0.1");
    let mut b = loopback_node(dir.path(), &m, &wrong, &["--peer", &peer]);
    // Both sides try to join each other: whichever answers first refuses
    // (and logs why), the other sees the refusal.
    let markers = ["does not hold this cluster's key", "refused by peer"];
    a.wait_log_any(&markers, secs(10));
    b.wait_log_any(&markers, secs(10));
    assert_eq!(plan_size(&a.status()).0, 1);
    assert_eq!(plan_size(&b.status()).0, 1);
}

#[test]
fn nodes_holding_different_models_each_serve_their_own() {
    let _serial = serial();
    use shoal_tests::synth::{write_synthetic_gguf, SynthSpec};
    let dir = tempfile::tempdir().unwrap();
    let (x, y) = (dir.path().join("x.gguf"), dir.path().join("y.gguf"));
    write_synthetic_gguf(
        &x,
        &SynthSpec {
            seed: 1,
            ..SynthSpec::default()
        },
    )
    .unwrap();
    write_synthetic_gguf(
        &y,
        &SynthSpec {
            seed: 2,
            ..SynthSpec::default()
        },
    )
    .unwrap();
    let mut a = loopback_cluster(dir.path(), &x, 1, "1G", &[]).remove(0);
    let key = dir.path().join("key").display().to_string();
    let (ys, first) = (y.display().to_string(), a.addr_on("127.0.0.1"));
    let mut b = loopback_node(dir.path(), &ys, &key, &["--peer", &first]);
    let other_model = |s: &Value| {
        plan_size(s).0 == 2
            && s["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n["same_model"] == false)
    };
    let sa = a.wait_status(secs(10), other_model);
    let sb = b.wait_status(secs(10), other_model);
    // Each leads the nodes of its own model (here: itself) and serves it
    // alone; neither can take the lead of the other's model and drop its
    // plan, whichever id is smaller.
    for s in [&sa, &sb] {
        assert_eq!(s["leader"], s["node_id"], "{s:#}");
    }
    for n in [&mut a, &mut b] {
        let s = n.wait_status(secs(10), |s| plan_size(s) == (2, 1));
        assert!(s["plan_error"].is_null(), "{s:#}");
        let (_, err, ok) = n.ask(&["-n", "4"], "hello");
        assert!(ok, "{err}");
    }
}
