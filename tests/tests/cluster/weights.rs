//! A node without the model fetches its layers from peers.

use crate::prelude::*;

#[test]
fn a_node_without_the_model_fetches_its_layers_from_peers_and_serves() {
    let _serial = serial();
    let model = default_model();
    let dir = tempfile::tempdir().unwrap();
    let key = keyfile(dir.path(), "key");
    let m = model.display().to_string();
    let base = [&["--max-memory", "60M"][..], &SMALL].concat();
    let loopback = [&["--cluster-key-file", &key][..], &LOOPBACK].concat();
    // The holder sends the header chunk corrupted once.
    let holder_args = [&["-m", &m][..], &loopback[..], &base[..]].concat();
    let mut holder = NodeProc::start_with_env(
        dir.path(),
        None,
        &holder_args,
        &[("SHOAL_FAULT_CORRUPT_CHUNK", "0")],
    );
    let first = holder.addr_on("127.0.0.1");
    let cache = dir.path().join("fetcher-cache");
    let cache_env = cache.display().to_string();
    let fetcher_args = [
        &["--from-peers", "--peer", &first][..],
        &loopback[..],
        &base[..],
    ]
    .concat();
    let start_fetcher = || {
        NodeProc::start_with_env(
            dir.path(),
            None,
            &fetcher_args,
            &[("SHOAL_CACHE_DIR", cache_env.as_str())],
        )
    };
    let mut fetcher = start_fetcher();
    fetcher.wait_log("chunk failed verification", secs(1));
    wait_plan(&mut holder, 2, 2);
    let settings: &[&str] = &["--temp", "0", "-n", "24"];
    let want = run_single(&model, settings, PROMPTS[0]);
    for via in [&fetcher, &holder] {
        let (got, err, ok) = via.ask(settings, PROMPTS[0]);
        assert!(ok, "{err}");
        assert_eq!(got, want, "via {}", via.http);
    }
    // It holds only what it runs (and what calibration read), verified.
    let w = fetcher.status()["weights"].clone();
    assert_eq!(w["complete"], false, "{w}");
    let (have, total) = (
        w["have_bytes"].as_u64().unwrap(),
        w["total_bytes"].as_u64().unwrap(),
    );
    assert!(have < total, "{w}");
    // A restart resumes from the cache instead of starting over.
    fetcher.kill();
    let mut again = start_fetcher();
    again.wait_log("resuming a fetch", secs(1));
    wait_plan(&mut holder, 2, 2);
    let (got, err, ok) = again.ask(settings, PROMPTS[0]);
    assert!(ok, "{err}");
    assert_eq!(got, want);
}
